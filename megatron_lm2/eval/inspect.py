"""Looking inside the memory: per-layer gate statistics and the read attention over slots
(the LM2 paper's sections 4.4-4.5), for one input.

    report = inspect_memory(model, tokens)        # tokens [B, S]
    report.gates      {layer: {'in', 'forget', 'out'}}   (memory_state.gate_stats)
    report.attention  {layer: [B, H_m, S, N]}            read probabilities over slots
    plot_read_attention(report, "heatmaps.png")

The read probabilities are recomputed outside LM2Memory, from its weights and the banks as
they stood chunk by chunk, so memory.py keeps no inspection hooks. A forward pre-hook only
records each memory layer's input (the normed token states); the recurrence is replayed
with the module's own write, so the banks are exactly the ones the forward used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from torch import Tensor

from megatron_lm2.fileio import atomic_path
from megatron_lm2.memory import LM2Memory
from megatron_lm2.memory_state import gate_stats, memory_modules


@dataclass
class MemoryReport:
    gates: dict = field(default_factory=dict)
    attention: dict = field(default_factory=dict)  # layer -> [B, H_m, S, N]
    reads: dict = field(default_factory=dict)  # layer -> E_mem [S, B, H_m*d_h] (this rank's heads)
    chunk_size: int = 0  # the bank changes between chunks: the heatmaps mark their borders

    def entropy(self) -> dict:
        """Mean read entropy per layer, in nats (log N = uniform over slots)."""
        out = {}
        for layer, p in self.attention.items():
            out[layer] = float(-(p.clamp_min(1e-12).log() * p).sum(-1).mean())
        return out


@torch.no_grad()
def read_attention(module: LM2Memory, hidden_states: Tensor, start_bank: Optional[Tensor] = None):
    """Replay one memory layer on its input E [S, B, d]: the read probabilities over slots
    [B, H_m, S, N] and the read E_mem [S, B, H_m*d_h], chunk by chunk (bank after chunk j-1
    for chunk j). start_bank: the bank the forward started from (default M_0)."""
    seq_len, batch, _ = hidden_states.shape
    h, dh = module.num_heads, module.head_dim
    lo = module.tp_rank * module.local_hidden
    query = module.linear_q(hidden_states)[0].view(seq_len, batch, h, dh)
    # The written chunks (every one but the last) as the write takes them (memory_write_shift).
    written = module.write_tokens(hidden_states[: module.chunk_size * ((seq_len - 1) // module.chunk_size)])
    token_values = written[..., lo:lo + module.local_hidden].reshape(written.shape[0], batch, h, dh)
    bank = start_bank if start_bank is not None else \
        module.initial_bank.to(hidden_states.dtype).unsqueeze(0).expand(batch, -1, -1)
    probs, reads = [], []
    C = module.chunk_size
    for start in range(0, seq_len, C):
        end = min(start + C, seq_len)
        kv = module.linear_kv(gather_from_tensor_model_parallel_region(bank))[0]
        kv = kv.view(batch, module.num_slots, h, 2, dh)
        key, value = kv[..., 0, :], kv[..., 1, :]
        scores = module.scores(query[start:end], key)
        p = torch.softmax(scores.float(), dim=-1)
        probs.append(p)
        reads.append(torch.einsum("bhcn,bnhe->cbhe", p.to(value.dtype), value))
        if end < seq_len:  # the module's own write (Eq. 4-6), so the banks are the forward's
            write_scores = module.scores(query[start:end], key, "write") if module.write_mode == "attention" else None
            bank, _ = module._write(bank, write_scores, token_values[start:end], written[start:end], reads[-1])
    attention = torch.cat(probs, dim=2)
    e_mem = torch.cat(reads, dim=0).reshape(seq_len, batch, module.local_hidden)
    return attention, e_mem


@torch.no_grad()
def inspect_memory(model, tokens: Tensor, position_ids: Optional[Tensor] = None,
                   attention_mask: Optional[Tensor] = None) -> MemoryReport:
    """Run the model once on tokens [B, S] (from M_0) and collect gates and read attention."""
    modules = memory_modules(model)
    if not modules:
        raise ValueError("the model has no memory layers (a vanilla flavor?)")
    inputs: dict[int, Tensor] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, kwargs, n=n: inputs.__setitem__(n, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
        model(tokens, position_ids, attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    report = MemoryReport(gates=gate_stats(model), chunk_size=next(iter(modules.values())).chunk_size)
    for n, module in modules.items():
        report.attention[n], report.reads[n] = read_attention(module, inputs[n])
    return report


def plot_read_attention(report: MemoryReport, path: str, sample: int = 0,
                        tokens: Optional[Sequence[str]] = None, title: str = "") -> str:
    """One heatmap per memory layer (rows) and memory head (columns): tokens down, slots
    across. Written atomically to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(report.attention)
    heads = report.attention[layers[0]].shape[1]
    fig, axes = plt.subplots(len(layers), heads, figsize=(2.6 * heads + 1, 2.4 * len(layers) + 0.8),
                             squeeze=False, constrained_layout=True)
    for r, layer in enumerate(layers):
        p = report.attention[layer][sample].float().cpu()
        for c in range(heads):
            ax = axes[r][c]
            image = ax.imshow(p[c].numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                              vmin=0.0, vmax=float(p.max()))
            ax.set_title(f"layer {layer}, head {c}", fontsize=8)
            if report.chunk_size:
                for border in range(report.chunk_size, p.shape[1], report.chunk_size):
                    ax.axhline(border - 0.5, color="white", linewidth=0.6, linestyle="--")
            ax.set_xlabel("slot", fontsize=7)
            ax.set_ylabel("token", fontsize=7)
            ax.tick_params(labelsize=6)
            if tokens is not None and len(tokens) <= 40:
                ax.set_yticks(range(len(tokens)))
                ax.set_yticklabels(tokens, fontsize=5)
        fig.colorbar(image, ax=axes[r].tolist(), fraction=0.02)
    gates = ", ".join(f"L{n}: in {g.get('in', float('nan')):.2f} forget {g.get('forget', float('nan')):.2f} "
                      f"out {g['out']:.2f}" for n, g in sorted(report.gates.items()))
    fig.suptitle((title + "\n" if title else "") + gates, fontsize=8)
    with atomic_path(path, suffix=".png", fsync=False) as tmp:
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
    return path


def plot_gate_stats(gates: dict, path: str, title: str = "") -> str:
    """Bar chart of the mean input / forget / output gate per memory layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(gates)
    kinds = ("in", "forget", "out")
    fig, ax = plt.subplots(figsize=(1.2 * len(layers) + 3, 3))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        ax.bar([x + i * width for x in range(len(layers))], [gates[n].get(kind, float("nan")) for n in layers],
               width, label=kind)
    ax.set_xticks([x + width for x in range(len(layers))])
    ax.set_xticklabels([f"layer {n}" for n in layers])
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean gate")
    ax.legend(fontsize=8)
    ax.set_title(title or "memory gates")
    fig.tight_layout()
    with atomic_path(path, suffix=".png", fsync=False) as tmp:
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
    return path
