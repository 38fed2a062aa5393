"""An independent float64 statement of the LM2 memory equations (docs/memory.md), written
with explicit per-sample, per-chunk and per-head loops and no code shared with
megatron_lm2.memory. Weights come in as plain [out, in] matrices."""

from __future__ import annotations

import math

import torch


def memory_reference(
    tokens: torch.Tensor,  # [T, B, d] normed block input
    weights: dict,  # q, k, v, out_gate, in_gate, forget_gate, proj: [d, d]; initial: [N, d]
    heads: int,
    chunk: int,
    write: str = "attention",
    initial_banks: torch.Tensor | None = None,  # [B, N, d] to continue from, else `initial`
    qk_norm: bool = False,
    norm_eps: float = 1e-6,
    forget_bias: float = 0.0,
    shift: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (memory branch output [T, B, d], bank after the last chunk [B, N, d]).

    qk_norm: every head's query and slot key are divided by their root mean square
    (sqrt(mean(x^2) + eps)); the score is then their cosine (dot product / d_h) times a learned
    per-head scale, weights["read_scale"][h] for the read and weights["write_scale"][h] for the
    write. Without it, one score Q K^T / sqrt(d_h) serves both.

    weights["write_salience"] ([heads, d], optional): the write's logit of token t for every slot
    of head h gains e_t . write_salience[h].

    forget_bias: a constant added to every forget-gate logit, g_forget = sigmoid(x W_f^T + b).

    shift (the study's prototype): the write takes w_t = e_t + e_(t-1) + ... + e_(t-shift), terms
    from the same chunk only, where it takes token states (the attention write's values, the
    token write's content and gates); the scores keep e_t."""
    seq, batch, d = tokens.shape
    head_dim = d // heads
    sigmoid = torch.sigmoid
    out = torch.zeros_like(tokens)
    final_banks = []
    for b in range(batch):
        bank = (weights["initial"] if initial_banks is None else initial_banks[b]).clone()
        read_all = torch.zeros(seq, d, dtype=tokens.dtype)
        for start in range(0, seq, chunk):
            e = tokens[start : start + chunk, b]  # [c, d]
            w = e.clone()
            for back in range(1, shift + 1):
                for t in range(back, e.shape[0]):
                    w[t] = w[t] + e[t - back]
            q = e @ weights["q"].T
            k = bank @ weights["k"].T
            v = bank @ weights["v"].T
            read = torch.zeros_like(e)
            content = torch.zeros_like(bank)
            for h in range(heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                if qk_norm:
                    qh, kh = q[:, cols], k[:, cols]
                    qh = qh / torch.sqrt((qh * qh).mean(dim=1, keepdim=True) + norm_eps)
                    kh = kh / torch.sqrt((kh * kh).mean(dim=1, keepdim=True) + norm_eps)
                    cosine = qh @ kh.T / head_dim  # [c, N]
                    scores = weights["read_scale"][h] * cosine
                    write_scores = weights["write_scale"][h] * cosine if write == "attention" else None
                else:
                    scores = q[:, cols] @ k[:, cols].T / math.sqrt(head_dim)  # [c, N]
                    write_scores = scores
                read[:, cols] = torch.softmax(scores, dim=1) @ v[:, cols]  # Eq. 1
                if write == "attention":  # slots gather: each slot's weights over the chunk's tokens
                    write_logits = write_scores.T  # [N, c]
                    if "write_salience" in weights:  # + a per-token bias, the same for every slot
                        write_logits = write_logits + (e @ weights["write_salience"][h])[None, :]
                    content[:, cols] = torch.softmax(write_logits, dim=1) @ w[:, cols]
            read_all[start : start + chunk] = read
            if write == "attention":
                g_in = sigmoid(content @ weights["in_gate"].T)  # Eq. 4
                g_forget = sigmoid(content @ weights["forget_gate"].T + forget_bias)  # Eq. 5
                bank = g_in * torch.tanh(content) + g_forget * bank  # Eq. 6
            elif write == "token":  # slot i <- token i; both gates read the token
                g_in = sigmoid(w @ weights["in_gate"].T)
                g_forget = sigmoid(w @ weights["forget_gate"].T + forget_bias)
                bank = g_in * torch.tanh(w) + g_forget * bank
            else:  # aligned: slot i <- token i
                g_in = sigmoid(e @ weights["in_gate"].T)
                g_forget = sigmoid(read @ weights["forget_gate"].T + forget_bias)
                bank = g_in * torch.tanh(read) + g_forget * bank
        g_out = sigmoid(read_all @ weights["out_gate"].T)  # Eq. 2
        out[:, b] = (g_out * read_all) @ weights["proj"].T  # Eq. 3 + output projection
        final_banks.append(bank)
    return out, torch.stack(final_banks)


def weights_of(memory_module, num_heads: int) -> dict:
    """Unfused [out, in] matrices from a (TP=1) LM2Memory module."""
    d = memory_module.linear_q.weight.shape[1]
    head_dim = d // num_heads
    # The state dict names every gate on its own even where the module fuses their GEMMs.
    state = {k: v.detach() for k, v in memory_module.state_dict().items() if torch.is_tensor(v)}
    kv = state["linear_kv.weight"].view(num_heads, 2, head_dim, d)
    return dict(
        q=state["linear_q.weight"],
        k=kv[:, 0].reshape(d, d),
        v=kv[:, 1].reshape(d, d),
        out_gate=state["linear_out_gate.weight"],
        in_gate=state["linear_in_gate.weight"],
        forget_gate=state["linear_forget_gate.weight"],
        proj=state["linear_proj.weight"],
        initial=memory_module.initial_bank.detach(),
        **{
            name: getattr(memory_module, f"{name[:-6]}_logit_scale").detach()
            for name in ("read_scale", "write_scale")
            if hasattr(memory_module, f"{name[:-6]}_logit_scale")
        },
        **(
            {"write_salience": memory_module.write_salience.detach()}
            if hasattr(memory_module, "write_salience")
            else {}
        ),
    )


def random_memory(**overrides):
    """(config, module): the LM2Memory under test (local spec, float64, 40 tokens in chunks of
    8, 12 slots, 4 heads, d=64 unless `overrides` say otherwise), with seeded random weights of
    a spread large enough that every gate and softmax is far from uniform."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.specs import get_memory_local_spec

    fields = dict(hidden_size=64, num_attention_heads=4, memory_heads=4, memory_slots=12,
                  memory_chunk_size=8, seq_length=40, params_dtype=torch.float64)
    cfg = get_flavor("debug", **{**fields, **overrides})
    torch.manual_seed(0)
    module = build_module(get_memory_local_spec(), config=cfg, layer_number=1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return cfg, module
