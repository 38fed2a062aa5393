"""The model config stored next to a Megatron checkpoint (`lm2_config.json`), and its mapping to
and from the Hugging Face configs (LM2Config with remote code, or LlamaConfig).

    {"format_version": 2, "model": {"num_layers": 16, ..., "params_dtype": "bfloat16",
     "vocab_size": 49152, ..., "memory_layers": null, ...}, "tensor_model_parallel_size": 2, ...}

"model" holds every model field megatron_lm2.config declares (MODEL_FIELDS; JSON values: tuples
as lists, the dtype by name), and a reader needs all of them (a field declared
optional_in_record may be absent: it came later, and its default is what older models did).
Everything else (norm, activation, fusions, init) is the Llama-3 decoder of
megatron_lm2.flavors.llama_decoder. lm2-train writes the file into every checkpoint, lm2-convert
into the checkpoints it makes. The converter supports what the flavors build: RMSNorm, SwiGLU,
RoPE, no biases, no QK norm, no MoE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn.functional as F

from megatron_lm2.config import MODEL_FIELDS, ConfigError, LM2Config
from megatron_lm2.fileio import write_json_atomic
from megatron_lm2.flavors import get_flavor, llama_decoder

CONFIG_FILE = "lm2_config.json"
# 2: params_dtype in "model"; version-1 records (lm2-convert's, without it) read the same way.
FORMAT_VERSION = 2

_FIELDS = {knob.name: knob for knob in MODEL_FIELDS}
ARCH_FIELDS = tuple(_FIELDS)
# Knobs with the same name, default and meaning in LM2Config and the HF LM2Config.
HF_FIELDS = tuple(knob.name for knob in MODEL_FIELDS if knob.hf)


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
    return {name: knob.plain(getattr(config, name)) for name, knob in _FIELDS.items()}


def config_from_dict(fields: dict, source: str = "config") -> LM2Config:
    """The LM2Config a record's "model" describes; every declared field must be there."""
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown model field(s) {unknown}")
    missing = [name for name, knob in _FIELDS.items() if name not in fields and not knob.optional_in_record]
    if missing:
        raise ConfigError(f"{source}: missing model field(s) {missing}")
    try:
        values = {name: _FIELDS[name].coerce(value) for name, value in fields.items()}
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    if "params_dtype" in values:
        values["pipeline_dtype"] = values["params_dtype"]
    return llama_decoder(**values)


def config_from_run_flags(run: dict, vocab_size: int | None = None, source: str = "checkpoint") -> LM2Config:
    """The model of an lm2-train checkpoint from before it carried lm2_config.json: the run's
    flavor with the model flags the run was given (its saved config; None = the flavor's value),
    read through the field declaration, not the trainer's flag parser. vocab_size: the saved
    embedding's rows (a run may have taken its vocabulary from the tokenizer, and padded it)."""
    overrides = {}
    for knob in MODEL_FIELDS:
        if knob.flag and run.get(knob.name) is not None:
            overrides[knob.name] = knob.coerce(run[knob.name])
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    try:
        return get_flavor(run["flavor"], **overrides)
    except ConfigError as error:
        raise ConfigError(f"{source}: the run's saved flags do not build a model: {error}") from None


def write_config(config: LM2Config, path: str | os.PathLike, **extra) -> None:
    """lm2_config.json for `config`, atomically (tmp + fsync + rename); `extra`: top-level
    entries beside "model" (the layout it was saved at)."""
    record = {"format_version": FORMAT_VERSION, "model": config_to_dict(config), **extra}
    write_json_atomic(path, record, indent=2, end="\n", fsync=True)


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
    if record.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {record['format_version']} is newer than this "
                         f"code reads ({FORMAT_VERSION}); update megatron-lm2")
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

    knobs = {name: getattr(config, name) for name in HF_FIELDS}
    knobs["memory_layers"] = list(config.memory_layer_numbers)
    return HFLM2Config(**kwargs, rope_theta=float(config.rotary_base), **knobs, **token_ids)


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
        # A knob added after a folder was exported (its own copy of configuration_lm2.py lacks
        # it) means what it meant then: the default.
        fields.update({name: getattr(hf_config, name) if hasattr(hf_config, name) or not
                       _FIELDS[name].optional_in_record else _FIELDS[name].default for name in HF_FIELDS},
                      memory_layers=tuple(hf_config.memory_layer_numbers))
    return llama_decoder(**fields)


def _as_number(theta: float):
    return int(theta) if float(theta).is_integer() else theta
