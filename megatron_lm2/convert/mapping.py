"""Weight names and layouts between Megatron (TP=1 view) and the Hugging Face Llama / LM2 models.

Megatron layouts (megatron/core, read from its code, not guessed):
  - self_attention.linear_qkv.weight [G * (H/G + 2) * d_h, d]: per query group g the rows are
    [q heads of group g..., k_g, v_g] (SelfAttention.get_query_key_value_tensors).
  - mlp.linear_fc1.weight [2 * ffn, d] with gated_linear_unit: [gate; up], the activation is
    applied to the first half (MLP.forward's glu: chunk(2)[0] is activated).
  - memory.linear_kv.weight [2d, d]: rows per memory head as [k_h; v_h] (megatron_lm2.memory).
Both directions are pure re-arrangements, so Megatron -> HF -> Megatron is bit-identical.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterator, Tuple

import torch

from megatron_lm2.config import LM2Config

Tensor = torch.Tensor

# Per-layer 1:1 renames (Megatron suffix, HF suffix).
_LAYER_RENAMES = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
    ("memory_norm.weight", "memory_norm.weight"),
    ("memory.linear_q.weight", "memory.q_proj.weight"),
    ("memory.linear_out_gate.weight", "memory.out_gate.weight"),
    ("memory.linear_in_gate.weight", "memory.in_gate.weight"),
    ("memory.linear_forget_gate.weight", "memory.forget_gate.weight"),
    ("memory.linear_proj.weight", "memory.o_proj.weight"),
    ("memory.initial_bank", "memory.initial_bank"),
    ("memory.read_logit_scale", "memory.read_logit_scale"),
    ("memory.write_logit_scale", "memory.write_logit_scale"),
)
_GLOBAL_RENAMES = (
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("decoder.final_layernorm.weight", "model.norm.weight"),
    ("output_layer.weight", "lm_head.weight"),
)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _attention_dims(config: LM2Config) -> Tuple[int, int, int]:
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    return heads, groups, config.kv_channels


def split_qkv(qkv: Tensor, config: LM2Config) -> Tuple[Tensor, Tensor, Tensor]:
    heads, groups, dh = _attention_dims(config)
    per_group = qkv.view(groups, heads // groups + 2, dh, qkv.shape[-1])
    q = per_group[:, : heads // groups].reshape(heads * dh, -1)
    k = per_group[:, heads // groups].reshape(groups * dh, -1)
    v = per_group[:, heads // groups + 1].reshape(groups * dh, -1)
    return q.clone(), k.clone(), v.clone()


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, config: LM2Config) -> Tensor:
    heads, groups, dh = _attention_dims(config)
    d = q.shape[-1]
    per_group = torch.cat(
        (
            q.view(groups, heads // groups, dh, d),
            k.view(groups, 1, dh, d),
            v.view(groups, 1, dh, d),
        ),
        dim=1,
    )
    return per_group.reshape(-1, d).clone()


def split_memory_kv(kv: Tensor, config: LM2Config) -> Tuple[Tensor, Tensor]:
    d = config.hidden_size
    per_head = kv.view(config.memory_heads, 2, config.memory_head_dim, d)
    return per_head[:, 0].reshape(d, d).clone(), per_head[:, 1].reshape(d, d).clone()


def fuse_memory_kv(k: Tensor, v: Tensor, config: LM2Config) -> Tensor:
    d = config.hidden_size
    shape = (config.memory_heads, 1, config.memory_head_dim, d)
    return torch.cat((k.view(shape), v.view(shape)), dim=1).reshape(2 * d, d).clone()


def megatron_to_hf(state: Dict[str, Tensor], config: LM2Config) -> Iterator[Tuple[str, Tensor]]:
    """Yield (HF name, tensor) for a full Megatron state dict, one tensor at a time."""
    seen = set()
    for name, tensor in state.items():
        seen.add(name)
        renamed = dict(_GLOBAL_RENAMES).get(name)
        if renamed is not None:
            if name == "output_layer.weight" and config.tie_embeddings:
                continue  # tied: HF ties lm_head to embed_tokens on load
            yield renamed, tensor.clone()
            continue
        match = _LAYER.match(name)
        if match is None:
            raise KeyError(f"unexpected Megatron tensor {name!r}")
        prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
        if rest == "self_attention.linear_qkv.weight":
            q, k, v = split_qkv(tensor, config)
            yield prefix + "self_attn.q_proj.weight", q
            yield prefix + "self_attn.k_proj.weight", k
            yield prefix + "self_attn.v_proj.weight", v
        elif rest == "mlp.linear_fc1.weight":
            gate, up = tensor.chunk(2, dim=0)
            yield prefix + "mlp.gate_proj.weight", gate.clone()
            yield prefix + "mlp.up_proj.weight", up.clone()
        elif rest == "memory.linear_kv.weight":
            k, v = split_memory_kv(tensor, config)
            yield prefix + "memory.k_proj.weight", k
            yield prefix + "memory.v_proj.weight", v
        else:
            renamed = dict(_LAYER_RENAMES).get(rest)
            if renamed is None:
                raise KeyError(f"unexpected Megatron tensor {name!r}")
            yield prefix + renamed, tensor.clone()


def hf_to_megatron(get: Callable[[str], Tensor], names, config: LM2Config) -> Dict[str, Tensor]:
    """The full Megatron state dict from HF tensors; `get(name)` reads one HF tensor (lazily,
    e.g. from safetensors), `names` lists the HF names present."""
    names = set(names)
    used = set()

    def take(name):
        if name not in names:
            raise KeyError(f"the Hugging Face weights lack {name!r}")
        used.add(name)
        return get(name)

    state = {
        "embedding.word_embeddings.weight": take("model.embed_tokens.weight"),
        "decoder.final_layernorm.weight": take("model.norm.weight"),
    }
    if not config.tie_embeddings:
        state["output_layer.weight"] = take("lm_head.weight")
    elif "lm_head.weight" in names:
        used.add("lm_head.weight")  # a tied copy some exporters write
    memory_layers = set(config.memory_layer_numbers)
    for i in range(config.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        state[mg + "self_attention.linear_qkv.weight"] = fuse_qkv(
            take(hf + "self_attn.q_proj.weight"),
            take(hf + "self_attn.k_proj.weight"),
            take(hf + "self_attn.v_proj.weight"),
            config,
        )
        state[mg + "mlp.linear_fc1.weight"] = torch.cat(
            (take(hf + "mlp.gate_proj.weight"), take(hf + "mlp.up_proj.weight")), dim=0
        )
        for mg_rest, hf_rest in _LAYER_RENAMES:
            if mg_rest.startswith("memory") and i + 1 not in memory_layers:
                continue
            if mg_rest == "memory.initial_bank" and config.memory_init != "learned":
                continue
            if mg_rest.endswith("_logit_scale") and mg_rest.removeprefix("memory.") not in config.memory_logit_scales:
                continue
            state[mg + mg_rest] = take(hf + hf_rest)
        if i + 1 in memory_layers:
            state[mg + "memory.linear_kv.weight"] = fuse_memory_kv(
                take(hf + "memory.k_proj.weight"), take(hf + "memory.v_proj.weight"), config
            )
    # Non-persistent tables some exporters write (rotary inv_freq) carry no weights.
    leftover = sorted(n for n in names - used if not n.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise KeyError(f"Hugging Face tensors with no Megatron counterpart: {leftover[:8]}")
    return state
