"""Build an LM2 model: Megatron-core's GPTModel with the LM2 block spec.

    model = build_model(get_flavor("debug"))

A flavor without memory builds exactly Megatron's GPTModel with its GPT layer spec.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_lm2.config import LM2Config
from megatron_lm2.specs import get_lm2_block_spec


def build_model(
    config: LM2Config,
    backend: str = "local",
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
) -> GPTModel:
    """The model chunk for this pipeline stage (the whole model without PP). Needs Megatron's
    parallel state (megatron_lm2.distributed.initialize)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if config.sequence_parallel and backend == "local":
        raise ValueError(
            "sequence_parallel=True needs the Transformer Engine spec (backend='te'): "
            "Megatron-core's local torch norms do not support sequence parallelism"
        )
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if config.vocab_size % tp:
        raise ValueError(
            f"vocab_size={config.vocab_size} is not divisible by tensor_model_parallel_size={tp}; "
            f"pad it with megatron_lm2.model.padded_vocab_size"
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_lm2_block_spec(config, backend, vp_stage=vp_stage),
        vocab_size=config.vocab_size,
        max_sequence_length=config.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=config.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=config.rotary_base,
        vp_stage=vp_stage,
    )


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int = 1, multiple: int = 128) -> int:
    """Megatron's padding rule: a multiple of `multiple * tp`, so each TP rank's embedding
    slice is aligned."""
    step = multiple * tensor_model_parallel_size
    return -(-vocab_size // step) * step


def attention_mask(seq_length: int, window: int | None = None, device=None) -> torch.Tensor | None:
    """Self-attention mask for the local spec ([1, 1, s, s], True = masked). None means
    Megatron's default causal mask. With a window W, attention is causal inside segments of W
    tokens and blocked across them (the memory carries what crosses)."""
    if window is None or window >= seq_length:
        return None
    position = torch.arange(seq_length, device=device)
    same_segment = (position[:, None] // window) == (position[None, :] // window)
    causal = position[None, :] <= position[:, None]
    return (~(same_segment & causal)).view(1, 1, seq_length, seq_length)
