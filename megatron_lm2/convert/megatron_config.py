"""The model config stored next to a Megatron checkpoint (`lm2_config.json`), and its mapping to
and from the Hugging Face configs (LM2Config with remote code, or LlamaConfig).

Only the fields that define the network are stored; everything else (dtypes, fusions, init)
comes from the Llama-3 defaults of megatron_lm2.flavors. The converter supports what the
flavors build: RMSNorm, SwiGLU, RoPE, no biases, no QK norm, no MoE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn.functional as F

from megatron_lm2.config import LM2Config
from megatron_lm2.flavors import get_flavor

CONFIG_FILE = "lm2_config.json"
FORMAT_VERSION = 1

ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "seq_length",
    "tie_embeddings",
    "rotary_base",
    "layernorm_epsilon",
    "memory_slots",
    "memory_heads",
    "memory_chunk_size",
    "memory_write",
    "memory_init",
    "memory_layers",
    "memory_bptt_chunks",
    "attention_window",
)


# Memory fields with the same name and meaning in LM2Config and the HF LM2Config.
_SHARED_MEMORY_FIELDS = (
    "memory_slots", "memory_heads", "memory_chunk_size", "memory_write", "memory_init",
    "attention_window",
)

def check_supported(config: LM2Config) -> None:
    """The converter maps a Llama-3 decoder; refuse anything else by name."""
    problems = []
    if config.normalization != "RMSNorm":
        problems.append(f"normalization={config.normalization!r} (need 'RMSNorm')")
    if not config.gated_linear_unit or config.activation_func is not F.silu:
        problems.append("the MLP is not SwiGLU (gated_linear_unit=True, activation silu)")
    if config.add_bias_linear or config.add_qkv_bias:
        problems.append("linear biases are not supported")
    if getattr(config, "qk_layernorm", False):
        problems.append("qk_layernorm is not supported")
    if getattr(config, "num_moe_experts", None):
        problems.append("MoE is not supported")
    if problems:
        raise ValueError("cannot convert this model: " + "; ".join(problems))


def config_to_dict(config: LM2Config) -> dict:
    check_supported(config)
    fields = {name: getattr(config, name) for name in ARCH_FIELDS}
    if fields["memory_layers"] is not None:
        fields["memory_layers"] = list(fields["memory_layers"])
    return fields


def config_from_dict(fields: dict, source: str = "config") -> LM2Config:
    unknown = sorted(set(fields) - set(ARCH_FIELDS))
    if unknown:
        raise ValueError(f"{source}: unknown model field(s) {unknown}")
    missing = sorted(set(ARCH_FIELDS) - set(fields) - {"memory_bptt_chunks", "attention_window"})
    if missing:
        raise ValueError(f"{source}: missing model field(s) {missing}")
    values = dict(fields)
    if values.get("memory_layers") is not None:
        values["memory_layers"] = tuple(values["memory_layers"])
    # Every architecture field is given, so the flavor only contributes the Llama-3 defaults.
    return get_flavor("debug", **values)


def write_config(config: LM2Config, path: str | os.PathLike, **extra) -> None:
    record = {"format_version": FORMAT_VERSION, "model": config_to_dict(config), **extra}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def read_config(checkpoint_dir: str | os.PathLike) -> LM2Config:
    path = Path(checkpoint_dir) / CONFIG_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (the model config of the checkpoint)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or "model" not in record:
        raise ValueError(f"{path}: expected an object with a 'model' entry")
    return config_from_dict(record["model"], source=str(path))


# ------------------------------------------------------------------------ Hugging Face side
def is_plain_llama(config: LM2Config) -> bool:
    """No memory and no attention window: exactly LlamaForCausalLM, no remote code needed."""
    return not config.has_memory and config.attention_window is None


def hf_config_kwargs(config: LM2Config) -> dict:
    """Keyword arguments shared by LM2Config (HF) and LlamaConfig."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads,
        head_dim=config.kv_channels,
        hidden_act="silu",
        max_position_embeddings=config.seq_length,
        rms_norm_eps=config.layernorm_epsilon,
        tie_word_embeddings=config.tie_embeddings,
    )


def to_hf_config(config: LM2Config, **token_ids):
    """The HF config object for this model: LlamaConfig when is_plain_llama, else LM2Config."""
    kwargs = hf_config_kwargs(config)
    if is_plain_llama(config):
        from transformers import LlamaConfig

        llama = LlamaConfig(**kwargs, attention_bias=False, mlp_bias=False, **token_ids)
        _set_rope_theta(llama, config.rotary_base)
        return llama
    from megatron_lm2.convert.hf_lm2.configuration_lm2 import LM2Config as HFLM2Config

    return HFLM2Config(
        **kwargs,
        rope_theta=float(config.rotary_base),
        **{name: getattr(config, name) for name in _SHARED_MEMORY_FIELDS},
        memory_layers=list(config.memory_layer_numbers),
        **token_ids,
    )


def _set_rope_theta(llama_config, theta) -> None:
    # transformers 5 keeps it in rope_parameters, 4.x in rope_theta.
    if isinstance(getattr(llama_config, "rope_parameters", None), dict):
        llama_config.rope_parameters["rope_theta"] = float(theta)
    else:
        llama_config.rope_theta = float(theta)


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        if params.get("rope_type", "default") != "default":
            raise ValueError(f"RoPE scaling {params.get('rope_type')!r} is not supported")
        return float(params["rope_theta"])
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling:
        raise ValueError(f"RoPE scaling {scaling} is not supported")
    return float(hf_config.rope_theta)


def from_hf_config(hf_config, vocab_size: int, seq_length: int | None = None) -> LM2Config:
    """The Megatron LM2Config of an HF LM2Config or LlamaConfig (vocab_size: padded size)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ("lm2", "llama"):
        raise ValueError(f"model_type={model_type!r}: only 'lm2' and 'llama' folders convert")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_config.hidden_act!r}: only SwiGLU (silu) converts")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ValueError("attention_bias / mlp_bias are not supported")
    heads = hf_config.num_attention_heads
    fields = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=hf_config.num_key_value_heads or heads,
        kv_channels=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        vocab_size=vocab_size,
        seq_length=seq_length or hf_config.max_position_embeddings,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        rotary_base=_as_number(_rope_theta(hf_config)),
        layernorm_epsilon=hf_config.rms_norm_eps,
    )
    if model_type == "llama":
        fields.update(memory_layers=())
    else:
        fields.update(
            {name: getattr(hf_config, name) for name in _SHARED_MEMORY_FIELDS},
            memory_layers=tuple(hf_config.memory_layer_numbers),
        )
    return get_flavor("debug", **fields)


def _as_number(theta: float):
    return int(theta) if float(theta).is_integer() else theta
