"""Pretraining LM2 on Megatron-core, one file per concern:

    config.py      TrainConfig (the one typed config) and its Megatron-style flags
    build.py       model chunks (DDP, bf16), optimizer and LR schedule from a TrainConfig
    data.py        GPTDataset / mock data through BlendedMegatronDatasetBuilder, resumable sampler
    dali.py        the optional DALI loader backend (same batches)
    checkpoint.py  atomic dist_checkpointing save/load, keep-last-K, `latest` tracker
    metrics.py     step log line, MFU, TensorBoard / W&B
    trainer.py     the loop
    plan.py        dry run: a layout's parallel sizes, batch arithmetic, memory and launch line
"""
