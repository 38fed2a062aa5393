"""Build an LM2 model: Megatron-core's GPTModel with the LM2 block spec.

    model = build_model(get_flavor("debug"))
    logits = model(tokens, position_ids, None)   # the model builds its attention-window mask

A flavor without memory builds Megatron's GPTModel with its GPT layer spec; the one addition
(LM2GPTModel) is that the model owns its self-attention mask.
"""

from __future__ import annotations

from collections import OrderedDict

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
    return LM2GPTModel(
        backend=backend,
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


class LM2GPTModel(GPTModel):
    """Megatron's GPTModel that builds its own self-attention mask from its config: called with
    attention_mask=None, it uses the attention-window mask for the length of the tokens it
    gets (attention_mask below), built on their device once per (length, device) and kept
    (the last few). With no window, or a window no shorter than the sequence, that is None:
    Megatron's causal mask type needs no tensor. A mask passed in is used as given.

    Backends: the window needs the local spec's attention (the TE spec is causal over the
    whole sequence; specs.get_lm2_block_spec refuses a window shorter than seq_length there,
    and this forward refuses a longer evaluation sequence that would need one)."""

    _CACHED_MASKS = 4

    def __init__(self, *args, backend: str = "local", **kwargs):
        super().__init__(*args, **kwargs)
        self.transformer_backend = backend
        self._masks: OrderedDict = OrderedDict()

    def attention_mask_for(self, length: int, device) -> torch.Tensor | None:
        """The self-attention mask for `length` tokens on `device` ([1, 1, s, s], True =
        masked), or None for Megatron's causal mask."""
        window = self.config.attention_window
        if window is None or window >= length:
            return None
        if self.transformer_backend != "local":
            raise ValueError(
                f"a {length}-token sequence needs the attention-window mask (attention_window="
                f"{window}), which the {self.transformer_backend!r} spec's causal attention ignores; use the "
                f"'local' spec")
        key = (length, torch.device(device))
        mask = self._masks.get(key)
        if mask is None:
            mask = attention_mask(length, window, device)
            self._masks[key] = mask
            while len(self._masks) > self._CACHED_MASKS:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(key)
        return mask

    def forward(self, input_ids, position_ids, attention_mask=None, decoder_input=None, labels=None,
                inference_context=None, *args, **kwargs):
        # Incremental decoding (an inference context) brings its own masking.
        if attention_mask is None and inference_context is None and kwargs.get("inference_params") is None:
            attention_mask = self.attention_mask_for(
                *self._length_and_device(input_ids, position_ids, decoder_input))
        return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels,
                               inference_context, *args, **kwargs)

    def _length_and_device(self, input_ids, position_ids, decoder_input):
        """Tokens [b, s] on the first pipeline stage; later stages get them too from the trainer,
        else the positions [b, s] or the decoder input [s, b, h]."""
        for tensor, dim in ((input_ids, 1), (position_ids, -1), (decoder_input, 0)):
            if tensor is not None:
                return tensor.shape[dim], tensor.device
        return self.config.seq_length, next(self.parameters()).device


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int = 1, multiple: int = 128) -> int:
    """Megatron's padding rule: a multiple of `multiple * tp`, so each TP rank's embedding
    slice is aligned."""
    step = multiple * tensor_model_parallel_size
    return -(-vocab_size // step) * step


def attention_mask(seq_length: int, window: int | None = None, device=None) -> torch.Tensor | None:
    """Self-attention mask for the local spec ([1, 1, s, s], True = masked). None means
    Megatron's default causal mask. With a window W, attention is causal inside segments of W
    tokens and blocked across them (the memory carries what crosses). The model builds and
    keeps its own (LM2GPTModel.attention_mask_for); this is for code that passes one."""
    if window is None or window >= seq_length:
        return None
    position = torch.arange(seq_length, device=device)
    same_segment = (position[:, None] // window) == (position[None, :] // window)
    causal = position[None, :] <= position[:, None]
    return (~(same_segment & causal)).view(1, 1, seq_length, seq_length)
