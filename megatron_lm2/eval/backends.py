"""Load a model for evaluation: a Hugging Face folder (an `lm2-convert` export or any causal
LM) or a Megatron dist checkpoint (with its lm2_config.json), in one process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from megatron_lm2.cli_errors import UserInputError


@dataclass
class Loaded:
    kind: str  # "hf" or "megatron"
    model: Any
    tokenizer: Any
    config: Any = None


def _register_lm2_with_auto() -> None:
    """Let AutoModelForCausalLM open an LM2 export without trust_remote_code, when the
    package ships the HF classes (megatron_lm2.convert.hf_lm2)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        from megatron_lm2.convert.hf_lm2 import configuration_lm2, modeling_lm2

        config_cls = configuration_lm2.LM2Config
        model_cls = modeling_lm2.LM2ForCausalLM
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    except Exception:  # noqa: BLE001 - the HF classes are optional; plain HF models still load
        pass


def load_hf(path: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> Loaded:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--hf {path}: no such directory")
    _register_lm2_with_auto()
    import transformers

    # transformers 5 renamed from_pretrained's `torch_dtype` to `dtype`; 4.x passes an unknown
    # `dtype` on to the model's constructor.
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **{dtype_key: getattr(torch, dtype)},
                                                     trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:  # a folder that is not a loadable model
        raise UserInputError(f"--hf {path}: cannot load it: {exc}") from exc
    return Loaded("hf", model.to(device).eval(), tokenizer, model.config)


def load_megatron(path: str, tokenizer: Optional[str] = None, overrides: Optional[dict] = None,
                  allow_unverified: bool = False) -> Loaded:
    """A dist checkpoint saved at any TP/PP, loaded at TP=1/PP=1 (megatron_lm2.convert)."""
    from megatron_lm2.convert.megatron_io import load_checkpoint
    from megatron_lm2.model import build_model
    from megatron_lm2.tokenizer import load_tokenizer

    config, state = load_checkpoint(path, allow_unverified)
    if overrides:
        config = config.replace(**overrides)
    model = build_model(config, pre_process=True, post_process=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {missing[:8]}, "
                         f"unexpected {list(unexpected)[:8]}")
    return Loaded("megatron", model.eval(), load_tokenizer(tokenizer), config)
