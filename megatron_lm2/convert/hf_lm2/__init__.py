"""The Hugging Face side of LM2 (torch + transformers only); copied into exported folders."""

from .configuration_lm2 import LM2Config
from .modeling_lm2 import LM2Cache, LM2ForCausalLM, LM2Model

__all__ = ["LM2Cache", "LM2Config", "LM2ForCausalLM", "LM2Model"]
