"""Checkpoint conversion between Megatron dist checkpoints and Hugging Face folders.

    lm2-convert to-hf   --load MEGATRON_CKPT --save HF_DIR [--tokenizer PATH]
    lm2-convert from-hf --load HF_DIR --save MEGATRON_CKPT --tensor-model-parallel-size T ...

The Hugging Face side (hf_lm2/) imports only torch and transformers; it is copied into every
exported LM2 folder. docs/convert.md has the commands and a generate() example.
"""
