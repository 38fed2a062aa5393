"""Layer and block specs: the LM2 memory layer mapped onto Megatron-core's local modules or
onto Transformer Engine's, as Megatron-core's own gpt_layer_specs do for the GPT layer.

Blocks without memory (a `memory_layers` subset, or the vanilla twin) use Megatron-core's
unmodified GPT layer spec, so a vanilla flavor *is* Megatron's GPTModel.
"""

from __future__ import annotations

import functools
from dataclasses import fields

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_lm2.attention import SDPADotProductAttention
from megatron_lm2.config import ConfigError, LM2Config
from megatron_lm2.layer import LM2TransformerLayer, LM2TransformerLayerSubmodules
from megatron_lm2.memory import LM2Memory, LM2MemorySubmodules

BACKENDS = ("local", "te")


def _te_modules():
    """Transformer Engine's modules, imported only when asked for. A TE that is installed
    but cannot load raises RuntimeError rather than ImportError, so catch everything."""
    try:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(
            "the 'te' spec needs Transformer Engine (pip install -e .[gpu] on a CUDA machine); "
            f"importing it failed: {exc!r}. Use the 'local' spec on this machine."
        ) from exc
    return TENorm, TEColumnParallelLinear, TERowParallelLinear


@functools.cache
def te_available() -> bool:
    """Whether the 'te' spec can be built here: Megatron-core's Transformer Engine modules
    import (the one probe; training.build picks its backend by it). Cached: a failed import
    is not retried."""
    try:
        _te_modules()
    except RuntimeError:
        return False
    from megatron_lm2.compat import warn_if_unsupported_transformer_engine

    warn_if_unsupported_transformer_engine()  # once per process (cached), not refused
    return True


def _memory_spec(column, row) -> ModuleSpec:
    return ModuleSpec(
        module=LM2Memory,
        submodules=LM2MemorySubmodules(
            linear_q=column,
            linear_kv=column,
            linear_out_gate=column,
            linear_in_gate=column,
            linear_forget_gate=column,
            linear_proj=row,
            linear_gates=column,
        ),
    )


def get_memory_local_spec() -> ModuleSpec:
    """The memory module alone, from Megatron-core's parallel linears."""
    return _memory_spec(ColumnParallelLinear, RowParallelLinear)


def _with_memory(base: ModuleSpec, norm, column, row) -> ModuleSpec:
    submodules = LM2TransformerLayerSubmodules(
        **{f.name: getattr(base.submodules, f.name) for f in fields(base.submodules)},
        memory_norm=norm,
        memory=_memory_spec(column, row),
        memory_bda=get_bias_dropout_add,
    )
    return ModuleSpec(module=LM2TransformerLayer, submodules=submodules)


def get_gpt_layer_spec(config: LM2Config, backend: str = "local") -> ModuleSpec:
    """Megatron-core's GPT layer (no memory) for this config and backend."""
    if backend == "local":
        spec = get_gpt_layer_local_spec(normalization=config.normalization)
        # Self-attention through torch's SDPA on GPUs (attention.py); megatron-core's path on CPU.
        spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
        return spec
    if backend == "te":
        _te_modules()
        return get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"unknown transformer backend {backend!r}; expected one of {BACKENDS}")


def get_lm2_layer_local_spec(config: LM2Config) -> ModuleSpec:
    """The LM2 layer from Megatron-core's own parallel linears and torch norms."""
    base = get_gpt_layer_spec(config, "local")
    norm = base.submodules.pre_mlp_layernorm  # the norm class the local GPT spec chose
    return _with_memory(base, norm, ColumnParallelLinear, RowParallelLinear)


def get_lm2_layer_te_spec(config: LM2Config) -> ModuleSpec:
    """The LM2 layer from Transformer Engine modules: FP8 through Megatron-core's fp8
    settings, TE's fused norms and GEMMs. The memory's norm stays separate from linear_q
    (not a TELayerNormColumnParallelLinear) because the write reads the normed tokens too."""
    te_norm, te_column, te_row = _te_modules()
    base = get_gpt_layer_spec(config, "te")
    return _with_memory(base, te_norm, te_column, te_row)


def get_lm2_block_spec(
    config: LM2Config, backend: str = "local", vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """Per-layer specs for the blocks this pipeline stage builds: LM2 layers where
    `config.memory_layers` says, Megatron's GPT layer elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown transformer backend {backend!r}; expected one of {BACKENDS}")
    if backend == "te" and config.attention_window is not None and config.attention_window < config.seq_length:
        # Megatron's TE spec builds self-attention as plain causal and ignores the mask the
        # window needs: the window would silently vanish on GPUs.
        raise ConfigError(
            f"attention_window={config.attention_window} needs the 'local' transformer spec "
            f"(--transformer-impl local): the Transformer Engine spec's attention is causal "
            f"over the whole sequence and would ignore the window"
        )
    plain = get_gpt_layer_spec(config, backend)
    memory = (
        (get_lm2_layer_local_spec if backend == "local" else get_lm2_layer_te_spec)(config)
        if config.has_memory
        else plain
    )
    with_memory = set(config.memory_layer_numbers)
    layer_specs = [
        memory if number in with_memory else plain for number in range(1, config.num_layers + 1)
    ]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = plain.submodules.pre_mlp_layernorm
    return TransformerBlockSubmodules(
        layer_specs=layer_specs[offset : offset + count], layer_norm=final_norm
    )
