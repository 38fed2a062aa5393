"""Data for megatron-lm2: the embedded synthetic pretraining corpus (``synthetic_corpus``) and the
input readers that lm2-preprocess and tokenizer training share (``readers``: jsonl / parquet
discovery, streaming tasks, row validation)."""
