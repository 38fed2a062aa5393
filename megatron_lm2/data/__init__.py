"""Data for megatron-lm2: the embedded synthetic pretraining corpus (``synthetic_corpus``)."""
