"""megatron-lm2: pretraining LM2 (Large Memory Models, arXiv 2502.06049) on Megatron-core."""

__version__ = "0.1.0"
