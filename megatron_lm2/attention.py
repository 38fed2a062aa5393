"""The local spec's self-attention core on GPUs: torch's scaled_dot_product_attention.

megatron-core's DotProductAttention (the local spec's core attention) materialises the scores
and keeps the softmax probabilities for backward, in fp32 and bf16: ~3.2 GB per layer at
micro-batch 4 x 2048 with 32 heads, ~51 GB over lm2-1.7b's 16 layers. On CUDA this subclass
calls scaled_dot_product_attention instead: flash attention for the plain causal mask (nothing
s x s is kept), the memory-efficient kernel for the attention-window mask. Elsewhere (CPU) it
is megatron-core's own path unchanged, so every CPU number stays what it was; a test forces
the SDPA path on CPU and checks it against the parent, values and gradients.
`LM2_LOCAL_ATTENTION=unfused` keeps megatron-core's path on GPUs too (a debugging switch).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention

def sdpa_enabled() -> bool:
    return os.environ.get("LM2_LOCAL_ATTENTION", "sdpa") != "unfused"


def sdpa_wanted(query: torch.Tensor) -> bool:
    return query.is_cuda and sdpa_enabled()


class SDPADotProductAttention(DotProductAttention):
    """DotProductAttention whose forward runs scaled_dot_product_attention where `sdpa_wanted`.
    The same weights (it has none), scale, dropout and masks: `attention_mask` is the local
    spec's boolean mask (True = masked), None for plain causal."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if (not sdpa_wanted(query) or attention_bias is not None or packed_seq_params is not None
                or self.softmax_offset is not None):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # GQA: each key/value head serves `groups` query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # megatron-core divides the scale by the layer number for fp16 and multiplies it back
        # inside its softmax: the product is the scale that reaches the scores.
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        dropout = self.attention_dropout.p if self.training else 0.0
        mask = None if attention_mask is None else ~attention_mask
        # Dropout under the TP RNG tracker's fork, as the parent does.
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel
               else contextlib.nullcontext())
        with rng:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                     is_causal=mask is None, scale=scale)
        # [b, heads, s, d] -> [s, b, heads * d]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(*context.shape[:2], self.hidden_size_per_partition)

