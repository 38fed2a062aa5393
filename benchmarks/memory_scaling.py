"""How does learning to use the memory scale with chunk size, slots and facts? LM2 (debug
flavor) against its vanilla twin on tasks only the memory can carry (megatron_lm2.eval.memory_tasks),
with the attention window equal to the memory chunk C, so nothing crosses a chunk but the bank.

One process trains one or more configs, one after another, one thread; each finished config
is appended to --results (JSON lines) and skipped when already there, so a study runs in parts
and resumes. Per run it records held-out accuracy every --eval-every steps, steps to 50 % / 90 %,
and diagnostics of the memory as it trains: per memory parameter gradient norms (at init and
at every eval), entropy of the write distribution (per slot over the chunk's tokens) and of the
read distribution (per token over slots), the write's weight on the fact tokens, gate means,
held-out accuracy per answer token (how many of the 16 values are found) and, at the end, with
the asked key swapped for one the facts do not hold (near chance only if the answer uses the key).

    python benchmarks/memory_scaling.py --task fact --chunk 64 --slots 32 --write attention --seeds 0,1,2
    python benchmarks/memory_scaling.py --task fact --chunk 256 --slots 256 --write qknorm --seeds 0
    python benchmarks/memory_scaling.py --report      # table + plots into benchmarks/memory_scaling.md's files
    python benchmarks/memory_scaling.py --task mqar --pairs 4 --models full   # attention over the whole sample

Models: `lm2`; `vanilla`, its twin without memory under the same window C (the control: chance by
construction); `full`, that twin with causal attention over the whole sample (not a control: the
bound on what this model and budget learn when self-attention can see the facts).

Write modes: every mode runs through `study_forward` below (TP = 1), a re-statement of the
module's equations (tested equal to megatron_lm2.memory.LM2Memory for the modes the module has),
so a prototype write can be measured before it lands in the module:
    attention   today's write: scores S = Q K^T / sqrt(d_h) shared by the read (softmax over slots)
                and the write (softmax over the chunk's tokens)
    salience    today's scores, plus a learned per-token, per-head bias in the write's softmax over
                tokens (b_t = E_t w_h, w zero-initialised): the model can learn which tokens are
                worth writing without first sharpening N slot-specific scores
    qknorm      RMS-normalised memory queries and slot keys per head, cosine scores times a learned
                per-head logit scale, one for the read (init --tau-read) and one for the write
                (init --tau-write), as QK-norm does for self-attention
    qknorm-salience  both
    token       no write scores at all: slot i takes token i of the chunk (N = C), gated as today
                (g_in, g_forget from that token's state). No softmax over the chunk, so nothing
                dilutes a fact by 1/C; the read's softmax over slots is the one thing to learn,
                as self-attention over the previous chunk would
    qknorm-token  the token write with the qknorm read (cosine scores times a learned per-head scale,
                init --tau-read): with the write's selection gone, the read's softmax over N = C slots is
                what starts flat (1/N on the fact), and this starts it sharper
    aligned     the paper's equations literally (N = C, slot i <- token i, g_in from the token,
                g_forget and the content from what the token read, E_mem): the module's own
                "aligned" write with dot scores, run by the module's forward
    qknorm-aligned  the aligned write with the qknorm read (init --tau-read)
    module      the module's own forward, whatever its memory_write is (no diagnostics but
                accuracy and gradients)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout (a GPU box)
from megatron_lm2.fileio import atomic_path, write_text_atomic  # noqa: E402
from megatron_lm2.eval.memory_tasks import (TaskBatch, TaskSpec, last_place_accuracy, make_batch,  # noqa: E402
                                            with_other_keys, without_facts)
from megatron_lm2.config import MEMORY_INIT_MODES, MEMORY_QK_INIT_MODES  # noqa: E402
from megatron_lm2.memory import chunk_shift_sum  # noqa: E402

EVAL_SEED = 123_456  # the held-out batch: the same for every run of a task
MODELS = ("lm2", "vanilla", "full")  # full: vanilla with attention over the whole sample
WRITE_MODES = ("attention", "qknorm", "salience", "qknorm-salience", "token", "qknorm-token", "aligned",
               "qknorm-aligned", "module")
MODULE_WRITES = ("aligned", "qknorm-aligned", "module")  # run by the module's own forward, not study_forward
RESULTS = "benchmarks/memory_scaling.jsonl"
DEFAULT_LR = 3e-3
DEFAULT_EPS = 1e-8  # AdamW's; runs recorded before --adam-eps existed used it
DEFAULT_FORGET_BIAS = 0.0  # the paper's gates have no bias; runs recorded before --forget-bias had none
DEFAULT_SHIFT = 0  # the write's tokens alone; runs recorded before --shift had no shift
DEFAULT_INIT = "identity"  # M_0; runs recorded before --init had the paper's identity
DEFAULT_QK_INIT = "independent"  # W_K drawn on its own; runs recorded before --qk-init had that
# Config keys added after runs were recorded: (key, what a record without it used, checkpoint-name tag).
LATER_KEYS = (("adam_eps", DEFAULT_EPS, "eps"), ("forget_bias", DEFAULT_FORGET_BIAS, "fb"),
              ("shift", DEFAULT_SHIFT, "sh"), ("init", DEFAULT_INIT, "m0"),
              ("qk_init", DEFAULT_QK_INIT, "qk"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="fact", choices=("fact", "mqar", "persist", "twohop"))
    p.add_argument("--chunk", type=int, default=32, help="memory chunk C = attention window")
    p.add_argument("--slots", default="32", help="N, or 'C', 'C/2', '2C'")
    p.add_argument("--pairs", type=int, default=1, help="mqar: key-value pairs in chunk 0")
    p.add_argument("--hops", type=int, default=1, help="persist: the question's chunk index k")
    p.add_argument("--models", default="lm2",
                   help="comma list of lm2, vanilla (window C: the control, at chance), full (vanilla with causal "
                        "attention over the whole sample: what this model and budget learn when attention sees the facts)")
    p.add_argument("--write", default="attention", help=f"one of {', '.join(WRITE_MODES)} (--init-only: a comma list)")
    p.add_argument("--tau-read", type=float, default=10.0, help="qknorm: initial read logit scale")
    p.add_argument("--tau-write", type=float, default=10.0, help="qknorm: initial write logit scale")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--forget-bias", type=float, default=DEFAULT_FORGET_BIAS,
                   help="a constant added to the forget gate's logits: g_forget = sigmoid(E W_f + b) "
                        "(3: the gate starts at 0.95, so a fact written once outlasts the chunks after it)")
    p.add_argument("--shift", type=int, default=DEFAULT_SHIFT,
                   help="memory_write_shift: the write's token i is E_i + E_(i-1) + ... + E_(i-shift) (within the chunk), so a slot "
                        "holds a token with the tokens before it: a key next to its value")
    p.add_argument("--init", default=DEFAULT_INIT, choices=MEMORY_INIT_MODES,
                   help="memory_init: M_0 (identity-signs: slots past d start as distinct sign vectors, not zeros)")
    p.add_argument("--qk-init", default=DEFAULT_QK_INIT, choices=MEMORY_QK_INIT_MODES,
                   help="memory_qk_init: tied = every memory head's key projection starts as its query projection, "
                        "so a token's query matches the slots that hold the same content from step 0")
    p.add_argument("--adam-eps", type=float, default=1e-8,
                   help="AdamW eps (the plateau's linear_q gradients are ~1e-9 per weight, below 1e-8)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--stop-at", type=float, default=1.01,
                   help="stop a run early once held-out accuracy reaches this (saves compute; "
                        "the curve is then padded with the last value)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--ckpt-dir", default="benchmarks/memory_scaling_ckpt",
                   help="a running config saves model/optimizer/data state here every --ckpt-every evals and a "
                        "rerun continues from it ('' = off); deleted once the run is in --results")
    p.add_argument("--ckpt-every", type=int, default=2, help="evals between checkpoints")
    p.add_argument("--report", action="store_true", help="only write the table and the plots")
    p.add_argument("--init-only", default=None, metavar="C,C,...",
                   help="diagnose at initialisation only (no training) for these chunk sizes, every "
                        "--write mode given as a comma list; appends to --init-results")
    p.add_argument("--init-results", default="benchmarks/memory_scaling_init.jsonl")
    p.add_argument("--report-md", default="benchmarks/memory_scaling_table.md")
    p.add_argument("--reference", default="benchmarks/memory_experiment.json",
                   help="the C = 32 record of examples/memory_experiment.py, shown with the study ('' = off)")
    p.add_argument("--plot-prefix", default="benchmarks/memory_scaling")
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="run every config of FILE (one set of this tool's flags per line, '#' comments, in "
                        "priority order; see benchmarks/memory_study_plan.txt) as --jobs processes side by "
                        "side, skipping what --results holds; for a GPU or a many-core machine")
    p.add_argument("--jobs", type=int, default=2, help="--plan: processes at a time")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="--plan: start nothing after this many seconds and stop what still runs at it "
                        "(a stopped run resumes from its last checkpoint on the next call)")
    p.add_argument("--log-dir", default=None, help="--plan: one log per process (default: next to --results)")
    return p.parse_args(argv)


def logit_scales(write: str, args) -> dict:
    """The qknorm modes' initial scales a config records: both for a scored write, the read's only
    for qknorm-token (its write has no scores), none for the other modes."""
    qk = write.startswith("qknorm")
    return dict(tau_read=args.tau_read if qk else None,
                tau_write=args.tau_write if qk and not write.endswith(("token", "aligned")) else None)


def resolve_slots(slots: str, chunk: int) -> int:
    table = {"C": chunk, "C/2": chunk // 2, "2C": 2 * chunk}
    return table[slots] if slots in table else int(slots)


# ------------------------------------------------------------------------ the memory forward
def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def study_forward(self, hidden_states, **unused):
    """LM2Memory.forward for one TP rank of size 1, no carried state, with the write selected by
    self.study_write and diagnostics collected into self.study_diag when self.study_collect."""
    seq, batch, d = hidden_states.shape
    h, dh, n, c = self.num_heads, self.head_dim, self.num_slots, self.chunk_size
    query = self.linear_q(hidden_states)[0].view(seq, batch, h, dh)
    written = chunk_shift_sum(hidden_states, c, getattr(self, "study_shift", 0))  # memory_write_shift
    values = written.view(seq, batch, h, dh)
    bank = self.initial_bank.to(hidden_states.dtype).unsqueeze(0).expand(batch, -1, -1)
    collect = getattr(self, "study_collect", False)
    keep = getattr(self, "study_keep", False)  # benchmarks/memory_probe.py: keep the read and the gate
    diag = {"write_entropy": [], "write_fact_mean": [], "write_fact_max": [], "read_entropy": [],
            "gate_in": [], "gate_forget": []}
    reads = []
    starts = list(range(0, seq, c))
    for j, start in enumerate(starts):
        end = min(start + c, seq)
        kv = self.linear_kv(bank)[0].view(batch, n, h, 2, dh)
        key, value = kv[..., 0, :], kv[..., 1, :]
        q = query[start:end]
        if self.study_write.startswith("qknorm"):
            cos = torch.einsum("cbhe,bnhe->bhcn", _rms(q), _rms(key)) / dh
            read_logits = cos * self.read_logit_scale.view(1, h, 1, 1)
            write_logits = cos * self.write_logit_scale.view(1, h, 1, 1) if hasattr(self, "write_logit_scale") else None
        else:
            read_logits = write_logits = torch.einsum("cbhe,bnhe->bhcn", q, key) / math.sqrt(dh)
        attn = torch.softmax(read_logits, dim=-1)
        reads.append(torch.einsum("bhcn,bnhe->cbhe", attn, value))
        if keep and j == len(starts) - 1:
            self.study_read = attn  # [B, h, c, N]: the last chunk's read over the slots
        if collect and j == len(starts) - 1:
            diag["read_entropy"].append(float(_entropy(attn).mean() / math.log(n)) if n > 1 else 0.0)
        if j + 1 < len(starts):
            if write_logits is not None:
                write_logits = write_logits.transpose(-1, -2)  # [B, h, N, c]: slots over tokens
            if self.study_write.endswith("salience"):
                # A learned per-token, per-head bias of the write: how much any slot takes of
                # this token. Zero at init (= the write without it); first-order in its weight.
                bias = torch.einsum("cbd,hd->bhc", hidden_states[start:end], self.write_salience)
                write_logits = write_logits + bias[:, :, None, :]
            if self.study_write.endswith("token"):
                if n != end - start:
                    raise ValueError(f"write 'token' needs slots = chunk, got N={n}, C={end - start}")
                w = torch.eye(n, dtype=hidden_states.dtype, device=hidden_states.device).expand(batch, h, n, n)
                content = written[start:end].transpose(0, 1)
            else:
                w = torch.softmax(write_logits, dim=-1)
                content = torch.einsum("bhnc,cbhe->bnhe", w, values[start:end]).reshape(batch, n, d)
            if hasattr(self, "linear_gates"):  # both gates in one GEMM: rows [input; forget]
                in_logits, forget_logits = self.linear_gates(content)[0].chunk(2, dim=-1)
            else:
                in_logits, forget_logits = self.linear_in_gate(content)[0], self.linear_forget_gate(content)[0]
            g_in = torch.sigmoid(in_logits)
            g_forget = torch.sigmoid(forget_logits + self.config.memory_forget_bias)
            if keep and j == 0:
                self.study_gate_in = g_in  # [B, N, d]: the input gate of chunk 0's write
            bank = g_in * torch.tanh(content) + g_forget * bank
            if collect:
                diag["write_entropy"].append(float(_entropy(w).mean() / math.log(end - start)))
                diag["gate_in"].append(float(g_in.mean()))
                diag["gate_forget"].append(float(g_forget.mean()))
                if j == 0 and getattr(self, "study_fact_mask", None) is not None:
                    fact = self.study_fact_mask[:, start:end].to(w.dtype)  # [B, c]
                    on_fact = torch.einsum("bhnc,bc->bhn", w, fact)
                    diag["write_fact_mean"].append(float(on_fact.mean()))
                    diag["write_fact_max"].append(float(on_fact.amax(-1).mean()))
    e_mem = torch.cat(reads, dim=0).reshape(seq, batch, d)
    g_out = torch.sigmoid(self.linear_out_gate(e_mem)[0])
    if collect:
        diag["gate_out"] = [float(g_out.mean())]
        self.study_diag = {k: (statistics.fmean(v) if v else None) for k, v in diag.items()}
    return self.linear_proj(g_out * e_mem)


def memory_modules(model):
    from megatron_lm2.memory import LM2Memory

    return [m for m in model.modules() if isinstance(m, LM2Memory)]


def install_write(model, write: str, tau_read: float = 10.0, tau_write: float = 10.0, shift: int = 0) -> None:
    """Route every memory module of `model` through study_forward with write mode `write`."""
    if write in MODULE_WRITES:
        return
    for m in memory_modules(model):
        if m.tp_rank != 0 or m.local_hidden != m.config.hidden_size:
            raise ValueError("the study forward is for tensor-parallel size 1")
        m.study_write = write
        m.study_shift = shift
        if write.endswith("salience"):
            m.write_salience = torch.nn.Parameter(torch.zeros(m.num_heads, m.config.hidden_size))
        if write.startswith("qknorm"):
            m.read_logit_scale = torch.nn.Parameter(torch.full((m.num_heads,), tau_read))
            if not write.endswith("token"):  # the token write has no scores to scale
                m.write_logit_scale = torch.nn.Parameter(torch.full((m.num_heads,), tau_write))
        m.forward = types.MethodType(study_forward, m)


# ------------------------------------------------------------------------------ training
def build(cfg_args: dict, seed: int):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.model import build_model

    spec = task_spec(cfg_args)
    flavor = "debug" if cfg_args["model"] == "lm2" else "debug-vanilla"
    window = None if cfg_args["model"] == "full" else spec.chunk  # full: the upper bound, not a control
    # The module's own write mode: "token" where the study runs it (so `module` can run it too),
    # else the default; study_forward replaces the forward for every other mode.
    write = cfg_args["write"]
    memory_write = cfg_args.get("memory_write") or (
        "token" if write.endswith("token") else "aligned" if write.endswith("aligned") else "attention")
    scores = cfg_args.get("memory_scores") or ("qknorm" if write == "qknorm-aligned" else "dot")
    config = get_flavor(flavor, vocab_size=spec.vocab_size, seq_length=spec.seq_length,
                        attention_window=window, memory_chunk_size=spec.chunk,
                        memory_slots=cfg_args["slots"], memory_write=memory_write,
                        memory_scores=scores,
                        memory_logit_scale=cfg_args.get("tau_read") or 10.0,
                        memory_forget_bias=cfg_args.get("forget_bias", DEFAULT_FORGET_BIAS),
                        memory_init=cfg_args.get("init", DEFAULT_INIT),
                        memory_qk_init=cfg_args.get("qk_init", DEFAULT_QK_INIT),
                        # `module` runs the module's shift; the study's forward shifts on its own
                        memory_write_shift=cfg_args.get("shift", DEFAULT_SHIFT) if write in MODULE_WRITES else 0)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_model(config)
    if config.has_memory:
        install_write(model, cfg_args["write"], cfg_args["tau_read"], cfg_args["tau_write"],
                      cfg_args.get("shift", DEFAULT_SHIFT))
    return model, spec


def task_spec(cfg_args: dict) -> TaskSpec:
    return TaskSpec(name=cfg_args["task"], chunk=cfg_args["chunk"], pairs=cfg_args["pairs"],
                    hops=cfg_args["hops"], num_keys=64 if cfg_args["pairs"] > 8 else 32)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _on(batch: TaskBatch, device) -> TaskBatch:
    """The task generators draw on the CPU (same samples on every machine); the model may be on a GPU."""
    return TaskBatch(*(t.to(device) for t in (batch.tokens, batch.labels, batch.loss_mask, batch.fact_mask)))


def _forward(model, batch: TaskBatch, mask):
    """`batch` on the model's device (callers move it once: they also read its labels and masks)."""
    pos = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)[None].expand_as(batch.tokens)
    return model(batch.tokens, pos, mask)


@torch.no_grad()
def accuracy(model, batch: TaskBatch, mask, micro: int = 64) -> float:
    return answer_hits(model, batch, mask, micro).float().mean().item()


@torch.no_grad()  # without it every held-out micro-batch kept its autograd graph: 2x a step's peak
def answer_hits(model, batch: TaskBatch, mask, micro: int = 64) -> torch.Tensor:
    """Bool, one entry per answer position of `batch` (row-major): whether the argmax is the label."""
    model.eval()
    hits = []
    for s in range(0, batch.tokens.shape[0], micro):
        part = TaskBatch(*(t[s : s + micro] for t in (batch.tokens, batch.labels, batch.loss_mask, batch.fact_mask)))
        part = _on(part, _device(model))
        logits = _forward(model, part, mask)
        hits.append(((logits.argmax(-1) == part.labels) & part.loss_mask.bool()).cpu())
    model.train()
    return torch.cat(hits)[batch.loss_mask.bool()]


def accuracy_by_fact_position(hits: torch.Tensor, batch: TaskBatch, chunk: int, parts: int = 4) -> list:
    """Held-out accuracy of one-answer tasks by where the fact's last token sits in chunk 0, in
    `parts` equal ranges of the chunk (with the identity M_0 and N > d, slots past d start alike)."""
    if batch.loss_mask.sum(1).max() != 1 or not batch.fact_mask.any(1).all():
        return []
    where = torch.arange(batch.fact_mask.shape[1]).expand_as(batch.fact_mask)
    last = torch.where(batch.fact_mask, where, -1).amax(1)
    part = (last * parts // chunk).clamp(max=parts - 1)
    return [round(hits[part == p].float().mean().item(), 4) if (part == p).any() else None for p in range(parts)]


def accuracy_by_answer(hits: torch.Tensor, batch: TaskBatch) -> dict:
    """Held-out accuracy per answer token id ({id: accuracy}), `hits` as answer_hits gives them.
    Runs of 2026-12-03 (4d2add7) found the one-fact plateau quantised by value: the read learns to find each value
    token on its own, so accuracy is k/16 with k values at ~100 % and the rest at 0. A model that
    always gives one answer scores that answer at 100 %: read it next to the overall accuracy."""
    answers = batch.labels[batch.loss_mask.bool()]
    return {int(a): round(hits[answers == a].float().mean().item(), 4) for a in answers.unique().tolist()}


def grad_norms(model) -> dict:
    """Gradient norm of every memory parameter, per layer (name: layer<k>.<param>)."""
    out = {}
    for m in memory_modules(model):
        for name, p in m.named_parameters():
            if p.grad is not None:
                out[f"layer{m.layer_number}.{name.replace('.weight', '')}"] = float(p.grad.norm())
    return out


@torch.no_grad()
def memory_diagnostics(model, batch: TaskBatch, mask) -> dict:
    mods = [m for m in memory_modules(model) if hasattr(m, "study_write")]
    if not mods:
        return {}
    part = TaskBatch(*(t[:64] for t in (batch.tokens, batch.labels, batch.loss_mask, batch.fact_mask)))
    part = _on(part, _device(model))
    for m in mods:
        m.study_collect, m.study_fact_mask = True, part.fact_mask
    model.eval()
    _forward(model, part, mask)
    model.train()
    out = {}
    for m in mods:
        m.study_collect, m.study_fact_mask = False, None
        for k, v in m.study_diag.items():
            out[f"layer{m.layer_number}.{k}"] = v
        for name in ("read_logit_scale", "write_logit_scale"):  # qk-norm; qknorm-token has the read's only
            if hasattr(m, name):
                out[f"layer{m.layer_number}.{name}"] = getattr(m, name).tolist()
    return out


def diagnose_at_init(args) -> None:
    """One forward/backward per (C, write) at initialisation: gradient norms, write/read entropy,
    the write's weight on the fact tokens, gates. Cheap enough for C up to the recipe's 1024."""
    from megatron_lm2.model import attention_mask

    done = {(r["chunk"], r["slots"], r["write"], r.get("tau_write"), r["seed"])
            for r in load_runs(args.init_results)}
    for chunk in (int(c) for c in args.init_only.split(",")):
        for write in args.write.split(","):
            cfg = dict(task=args.task, chunk=chunk, slots=resolve_slots(args.slots, chunk), pairs=args.pairs,
                       hops=args.hops, model="lm2", write=write, **logit_scales(write, args))
            for seed in (int(s) for s in args.seeds.split(",")):
                if (chunk, cfg["slots"], write, cfg["tau_write"], seed) in done:
                    continue
                t0 = time.time()
                model, spec = build(cfg, seed)
                mask = attention_mask(spec.seq_length, spec.chunk, _device(model))
                batch = _on(make_batch(spec, args.batch_size, 10_000 + seed), _device(model))
                diag = memory_diagnostics(model, batch, mask)
                loss = (_forward_loss(model, batch, mask) * batch.loss_mask).sum() / batch.loss_mask.sum()
                loss.backward()
                run = dict(cfg, seed=seed, batch_size=args.batch_size, loss=float(loss.detach()), grad_norm=grad_norms(model),
                           diagnostics=diag, seconds=time.time() - t0, commit=_commit(),
                           machine=f"{platform.machine()}, torch {torch.__version__}")
                append_run(args.init_results, run)
                print(f"[init] C={chunk} N={cfg['slots']} {write} seed {seed}: q grad "
                      f"{_mean_over_layers(run['grad_norm'], '.linear_q'):.2e}, write entropy "
                      f"{_mean_over_layers(diag, '.write_entropy'):.4f}, fact weight max "
                      f"{_mean_over_layers(diag, '.write_fact_max'):.4f} ({run['seconds']:.0f}s)", flush=True)


def loss_spikes(losses, window: int = 50, factor: float = 2.0, excess: float = 1.0) -> list[int]:
    """Steps whose training loss exceeds `factor` x the median of the `window` steps before them
    and that median by `excess` nats: optimisation spikes (at C = 256 the token write saw single
    steps at 12-13 against 2.8), not the noise of a loss that is already near 0."""
    spikes = []
    for i in range(window, len(losses)):
        median = statistics.median(losses[i - window:i])
        if losses[i] > factor * median and losses[i] > median + excess:
            spikes.append(i)
    return spikes


def steps_to(curve, level: float):
    for step, acc in curve:
        if acc >= level:
            return step
    return None


def train_one(cfg_args: dict, seed: int, args) -> dict:
    from megatron_lm2.model import attention_mask

    t0 = time.time()
    model, spec = build(cfg_args, seed)
    device = _device(model)
    mask = attention_mask(spec.seq_length, model.config.attention_window, device)  # build() chose the window
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                  eps=cfg_args.get("adam_eps", DEFAULT_EPS))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    data = torch.Generator().manual_seed(10_000 + seed)
    held_out = make_batch(spec, args.eval_samples, EVAL_SEED)
    curve, losses, grad_curve, diagnostics = [], [], [], []
    eval_seconds, train_seconds = 0.0, 0.0
    label = f"{cfg_args['model']} {cfg_args['write']} {spec.name} C={spec.chunk} N={cfg_args['slots']} seed {seed}"
    stopped = None
    ckpt = checkpoint_path(args, {**cfg_args, "seed": seed})
    first = 0
    if ckpt and os.path.exists(ckpt):
        # An interrupted run continues exactly where its last checkpoint left it.
        state = torch.load(ckpt, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        data.set_state(state["data"].cpu())
        first, curve, losses, diagnostics = state["step"], state["curve"], state["losses"], state["diagnostics"]
        grad_curve = state.get("grad_curve", [None] * len(losses))  # older checkpoints did not keep it
        eval_seconds, train_seconds = state["eval_seconds"], state["train_seconds"]
        t0 -= state["seconds"]
        print(f"[{label}] resumed at step {first} from {ckpt}", flush=True)
    for step in range(first, args.steps + 1):
        if ckpt and step > first and step % (args.eval_every * args.ckpt_every) == 0:
            _save_checkpoint(ckpt, dict(
                model=model.state_dict(), optimizer=optimizer.state_dict(), schedule=schedule.state_dict(),
                data=data.get_state(), step=step, cfg={**cfg_args, "seed": seed}, curve=curve, losses=losses, grad_curve=grad_curve, diagnostics=diagnostics,
                eval_seconds=eval_seconds, train_seconds=train_seconds, seconds=time.time() - t0))
        batch = _on(make_batch(spec, args.batch_size, data), device) if step < args.steps else None
        if step % args.eval_every == 0 or step == args.steps:
            te = time.time()
            hits = answer_hits(model, held_out, mask)
            curve.append((step, hits.float().mean().item()))
            diag = {"step": step, **memory_diagnostics(model, held_out, mask)}
            by_position = accuracy_by_fact_position(hits, held_out, spec.chunk)
            if by_position:
                diag["accuracy_by_fact_quarter"] = by_position
            by_answer = accuracy_by_answer(hits, held_out)
            diag["accuracy_by_answer"] = {str(a): v for a, v in by_answer.items()}  # JSON keys
            learned = sum(v >= 0.9 for v in by_answer.values())
            diag["answers_learned"] = [learned, len(by_answer)]
            eval_seconds += time.time() - te
            print(f"[{label}] step {step} acc {curve[-1][1]:.3f}, answers >= 90 %: {learned}/{len(by_answer)} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        else:
            diag = None
        if step == args.steps or curve[-1][1] >= args.stop_at:
            if step < args.steps:
                stopped = step
            break
        ts = time.time()
        per_token = _forward_loss(model, batch, mask)
        loss = (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if diag is not None:
            diag["grad_norm"] = grad_norms(model)
            diag["loss"] = float(loss.detach())
            diagnostics.append(diag)
        grad_curve.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        train_seconds += time.time() - ts
    run = dict(cfg_args, seed=seed, curve=curve, final_accuracy=curve[-1][1],
               best_accuracy=max(a for _, a in curve), steps_to_50=steps_to(curve, 0.5),
               steps_to_90=steps_to(curve, 0.9), stopped_at=stopped,
               final_loss=statistics.fmean(losses[-50:]) if losses else None, chance=spec.chance,
               losses=[round(x, 4) for x in losses], grad_norms=[None if g is None else round(g, 4) for g in grad_curve],
               diagnostics=diagnostics, seconds=time.time() - t0, train_seconds=train_seconds,
               eval_seconds=eval_seconds)
    if spec.name == "twohop":  # the one-hop shortcut on the same held-out stories: the bar for "two hops"
        run["last_place_accuracy"] = last_place_accuracy(held_out)
    if cfg_args["model"] != "vanilla":  # the models with a path to the facts
        run["without_facts_accuracy"] = accuracy(model, without_facts(spec, held_out, EVAL_SEED + 1), mask)
        if spec.name != "twohop":  # does the answer depend on the asked key? (chance if it does)
            run["other_key_accuracy"] = accuracy(model, with_other_keys(spec, held_out, EVAL_SEED + 2), mask)
    return run


def checkpoint_path(args, cfg: dict):
    if not args.ckpt_dir:
        return None
    import hashlib

    key = json.dumps([cfg.get(k) for k in CONFIG_KEYS] + [cfg["seed"]])
    name = f"{cfg['task']}_C{cfg['chunk']}_N{cfg['slots']}_{cfg['write']}_s{cfg['seed']}_" + \
        hashlib.sha1(key.encode()).hexdigest()[:10] + \
        "".join(f"_{tag}{_tag_value(cfg[k])}" for k, default, tag in LATER_KEYS if cfg.get(k, default) != default) + ".pt"
    return os.path.join(args.ckpt_dir, name)


def _tag_value(value) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def _save_checkpoint(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_path(path, unique=True, fsync=False) as tmp:
        torch.save(state, tmp)


def _forward_loss(model, batch: TaskBatch, mask):
    pos = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)[None].expand_as(batch.tokens)
    return model(batch.tokens, pos, mask, labels=batch.labels)


# ------------------------------------------------------------------------------ results
CONFIG_KEYS = ("task", "chunk", "slots", "pairs", "hops", "model", "write", "tau_read", "tau_write",
               "steps", "batch_size", "lr")


def run_key(run: dict) -> tuple:
    return tuple(run.get(k) for k in CONFIG_KEYS) + (run["seed"],) + \
        tuple(run.get(k, default) for k, default, _ in LATER_KEYS)


def load_runs(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    runs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError as e:
                # A torn last line (a killed writer) is skipped; the run is redone.
                print(f"{path}:{lineno}: skipping unreadable line ({e.msg})", file=sys.stderr)
    return runs


def append_run(path: str, run: dict) -> None:
    """One JSON line per finished run, under a lock: several processes share the file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(run) + "\n")
            f.flush()
            os.fsync(f.fileno())


from megatron_lm2.provenance import git_commit as _commit  # noqa: E402


# ------------------------------------------------------------------------------ report
def _label(r: dict) -> str:
    """The write and every optimizer setting that differs from the study's defaults (runs that
    differ only by seed share a label, and so a row of the table and a curve colour)."""
    eps = r.get("adam_eps", DEFAULT_EPS)
    fb = r.get("forget_bias", DEFAULT_FORGET_BIAS)
    sh = r.get("shift", DEFAULT_SHIFT)
    m0 = r.get("init", DEFAULT_INIT)
    qk = r.get("qk_init", DEFAULT_QK_INIT)
    return _base_label(r) + (f", M_0 {m0}" if m0 != DEFAULT_INIT else "") + \
        (f", shift {sh}" if sh != DEFAULT_SHIFT else "") + \
        (f", keys {qk}" if qk != DEFAULT_QK_INIT else "") + \
        (f", forget bias {fb:+g}" if fb != DEFAULT_FORGET_BIAS else "") + \
        (f", lr {r['lr']:g}" if r.get("lr", DEFAULT_LR) != DEFAULT_LR else "") + \
        (f", adam eps {eps:g}" if eps != DEFAULT_EPS else "") + \
        (f" (partial, step {r['partial_at']})" if "partial_at" in r else "")


def _base_label(r: dict) -> str:
    if r["model"] != "lm2":
        return "vanilla, full attention" if r["model"] == "full" else "vanilla"
    if r["write"].startswith("qknorm"):
        if r.get("tau_write") is None:  # qknorm-token: a read scale only
            return f"{r['write']}(tau {r['tau_read']:g})"
        return f"{r['write']}(tau {r['tau_read']:g}/{r['tau_write']:g})"
    return r["write"]


def _group_key(r: dict) -> tuple:
    return (r["task"], r["pairs"], r["hops"], r["chunk"], r["slots"], _label(r), r["steps"], r["batch_size"])


def _fmt_steps(values, budget) -> str:
    shown = [str(v) if v is not None else f">{budget}" for v in values]
    done = sorted(v for v in values if v is not None)
    med = statistics.median(values) if len(done) == len(values) else None
    if med is None:  # unfinished runs count as infinitely slow; a median among them is '>budget'
        med = statistics.median(done + [math.inf] * (len(values) - len(done)))
    head = f">{budget}" if math.isinf(med) else f"{med:g}"
    return f"{head} ({', '.join(shown)})"


def _mean_over_layers(d: dict, suffix: str):
    """Mean over layers of a scalar diagnostic; a per-head list (a logit scale) counts as its mean."""
    vals = [statistics.fmean(v) if isinstance(v, list) else v for k, v in d.items()
            if k.endswith(suffix) and v is not None and v != []]
    return statistics.fmean(vals) if vals else None


def _task_name(r: dict) -> str:
    return {"fact": "one fact", "mqar": f"mqar {r['pairs']} pairs", "persist": f"persist k={r['hops']}",
            "twohop": "two-hop (qa2)"}[r["task"]]


def _fmt_spikes(rs: list[dict]) -> str:
    """Per seed, the number of loss spikes (loss_spikes); '-' where a run predates the loss record."""
    counts = [str(len(loss_spikes(r["losses"]))) if r.get("losses") else "-" for r in rs]
    return "-" if set(counts) == {"-"} else ", ".join(counts)


def report_text(runs: list[dict]) -> str:
    groups: dict = {}
    for r in runs:
        groups.setdefault(_group_key(r), []).append(r)
    lines = ["| task | C | N | write | seeds | final acc % median [min, max] | steps to 50 % | steps to 90 % "
             "| facts removed % | other key % | loss spikes | chance % | s/run (train + eval) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], k[4], k[5])):
        rs = sorted(groups[key], key=lambda r: r["seed"])
        acc = [100 * r["final_accuracy"] for r in rs]
        # A run stopped early at its target keeps its last accuracy: report the best seen.
        best = [100 * r["best_accuracy"] for r in rs]
        ablated = [100 * r["without_facts_accuracy"] for r in rs if "without_facts_accuracy" in r]
        # the asked key swapped for one not in the facts: near chance if the answer uses the key
        other = [100 * r["other_key_accuracy"] for r in rs if "other_key_accuracy" in r]
        budget = rs[0].get("partial_at", rs[0]["steps"])  # a partial run: not reached *so far*
        lines.append(
            f"| {_task_name(rs[0])} | {key[3]} | {key[4]} | {key[5]} | {len(rs)} "
            f"({','.join(str(r['seed']) for r in rs)}) | {statistics.median(best):.1f} [{min(best):.1f}, {max(best):.1f}]"
            + (f" (last {statistics.median(acc):.1f})" if any(r.get('stopped_at') is None for r in rs) and best != acc else "")
            + f" | {_fmt_steps([r['steps_to_50'] for r in rs], budget)} | {_fmt_steps([r['steps_to_90'] for r in rs], budget)}"
            f" | {', '.join(f'{a:.1f}' for a in ablated) if ablated else 'n/a'}"
            f" | {', '.join(f'{a:.1f}' for a in other) if other else '-'} | {_fmt_spikes(rs)} | {100 * rs[0]['chance']:.1f}"
            + (f" (last place named: {100 * rs[0]['last_place_accuracy']:.1f})" if "last_place_accuracy" in rs[0] else "")
            + " | "
            f"{statistics.fmean(r['seconds'] for r in rs):.0f} ({statistics.fmean(r['train_seconds'] for r in rs):.0f}"
            f" + {statistics.fmean(r['eval_seconds'] for r in rs):.0f}) |")
    lines += ["", "Diagnostics (mean over the 4 memory layers; step 0 = initialisation; write entropy and read "
              "entropy as a fraction of uniform, log C and log N; fact weight = the write weight a slot puts on "
              "the fact tokens, mean over slots / best slot; uniform = 2/C):", "",
              "| task | C | N | write | seed | step | acc % | grad linear_q | grad linear_kv | grad in_gate | "
              "grad forget_gate | grad proj | write entropy | fact weight mean / max | read entropy | "
              "logit scale read / write | gates in / forget / out |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], k[4], k[5])):
        for r in sorted(groups[key], key=lambda r: r["seed"])[:1]:
            if not r["diagnostics"] or "grad_norm" not in r["diagnostics"][0]:
                continue
            acc = dict(r["curve"])
            diags = r["diagnostics"]
            picks = sorted(set(range(0, len(diags), 4)) | {len(diags) - 1})  # every 4th eval
            for i in picks:
                d = diags[i]
                g = d.get("grad_norm", {})

                def gn(name):
                    v = _mean_over_layers(g, "." + name)
                    return f"{v:.1e}" if v is not None else "-"

                def val(name, fmt="{:.3f}"):
                    v = _mean_over_layers(d, "." + name)
                    return fmt.format(v) if v is not None else "-"

                lines.append(
                    f"| {_task_name(r)} | {r['chunk']} | {r['slots']} | {_label(r)} | {r['seed']} | {d['step']} | "
                    f"{100 * acc.get(d['step'], float('nan')):.1f} | {gn('linear_q')} | {gn('linear_kv')} | "
                    f"{gn('linear_in_gate')} | {gn('linear_forget_gate') if gn('linear_gates') == '-' else gn('linear_gates') + ' (both)'} | {gn('linear_proj')} | "
                    f"{val('write_entropy')} | {val('write_fact_mean')} / {val('write_fact_max')} | "
                    f"{val('read_entropy')} | {val('read_logit_scale', '{:.1f}')} / {val('write_logit_scale', '{:.1f}')} | "
                    f"{val('gate_in', '{:.2f}')} / {val('gate_forget', '{:.2f}')} / "
                    f"{val('gate_out', '{:.2f}')} |")
    machines = sorted({r.get("machine", "?") for r in runs})
    commits = sorted({r.get("commit", "?") for r in runs})
    dates = sorted(r.get("started", "?") for r in runs)
    lines += ["", f"machine: {'; '.join(machines)}; commits: {', '.join(commits)}; "
              f"runs started {dates[0]} .. {dates[-1]}"]
    return "\n".join(lines)


def init_report_text(runs: list[dict]) -> str:
    """Median over seeds of the at-initialisation diagnostics, per (C, N, write)."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["chunk"], r["slots"], _label({**r, "model": "lm2"})), []).append(r)
    lines = ["| C | N | write | seeds | grad linear_q | grad linear_kv | grad gates (in, forget) | grad out_gate | "
             "grad proj | write entropy | fact weight, best slot (uniform 2/C) | read entropy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups):
        rs = groups[key]

        def med(get):
            vals = [get(r) for r in rs]
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else None

        def g(name):
            v = med(lambda r: _mean_over_layers(r["grad_norm"], "." + name))
            return f"{v:.1e}" if v is not None else "-"

        def d(name, fmt):
            v = med(lambda r: _mean_over_layers(r["diagnostics"], "." + name))
            return fmt.format(v) if v is not None else "-"

        gates = g("linear_gates") if g("linear_gates") != "-" else f"{g('linear_in_gate')}, {g('linear_forget_gate')}"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {len(rs)} | {g('linear_q')} | {g('linear_kv')} | {gates} | "
                     f"{g('linear_out_gate')} | {g('linear_proj')} | {d('write_entropy', '{:.4f}')} | "
                     f"{d('write_fact_max', '{:.4f}')} ({2 / key[0]:.4f}) | {d('read_entropy', '{:.4f}')} |")
    return "\n".join(lines)


def plot(runs: list[dict], prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    facts = [r for r in runs if r["task"] == "fact"]
    chunks = sorted({r["chunk"] for r in facts})
    if chunks:
        fig, axes = plt.subplots(1, len(chunks), figsize=(3.2 * len(chunks), 3.6), squeeze=False, sharey=True)
        labels = sorted({_label(r) for r in facts})
        colors = {lab: f"C{i}" for i, lab in enumerate(labels)}
        for ax, c in zip(axes[0], chunks):
            seen = set()
            for r in sorted(facts, key=lambda r: (_label(r), r["slots"], r["seed"])):
                if r["chunk"] != c:
                    continue
                steps, acc = zip(*r["curve"])
                name = f"{_label(r)} N={r['slots']}"
                ax.plot(steps, [100 * a for a in acc], color=colors[_label(r)],
                        linestyle={c // 2: ":", c: "-", 2 * c: "--"}.get(r["slots"], "-."), alpha=0.8,
                        label=name if name not in seen else None)
                seen.add(name)
            ax.axhline(100 / 16, color="gray", linewidth=0.8)
            ax.set_title(f"one fact, C = {c}")
            ax.set_xlabel("step")
            ax.set_ylim(0, 100)
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.3), frameon=False)  # below: no curve hidden
        axes[0][0].set_ylabel("held-out accuracy (%)")
        fig.tight_layout()
        written.append(_save(fig, f"{prefix}_accuracy.png"))
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for lab in labels:
            xs, med, lo, hi = [], [], [], []
            for c in chunks:
                rs = [r for r in facts if r["chunk"] == c and _label(r) == lab]
                if not rs:
                    continue
                vals = [r["steps_to_90"] if r["steps_to_90"] is not None else r["steps"] * 1.1 for r in rs]
                xs.append(c)
                med.append(statistics.median(vals))
                lo.append(min(vals))
                hi.append(max(vals))
            if xs:
                ax.errorbar(xs, med, yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
                            marker="o", capsize=3, color=colors[lab], label=lab)
        budget = max(r["steps"] for r in facts)
        ax.axhline(budget, color="gray", linestyle="--", linewidth=0.8, label=f"budget ({budget}; above = not reached)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("chunk size C (= attention window)")
        ax.set_ylabel("steps to 90 % held-out accuracy")
        ax.set_title("one fact: steps to 90 % (median, min-max over seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, f"{prefix}_steps_to_90.png"))
        plt.close(fig)
    return written


def _save(fig, path: str) -> str:
    with atomic_path(path, suffix=".png", fsync=False) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")  # legends placed outside the axes stay in
    return path


def reference_runs(path: str) -> list[dict]:
    """The C = 32 runs of examples/memory_experiment.py (the same one-fact task, model, optimizer,
    batch and budget; held-out 512 samples every 100 steps) in this tool's run format."""
    if not path or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    meta = data.get("meta", {})
    out = []
    for r in data["runs"]:
        if r["flavor"] != "debug":
            continue
        curve = [tuple(c) for c in r["curve"]]
        out.append(dict(task="fact", chunk=meta.get("window", 32), slots=32, pairs=1, hops=1, model="lm2",
                        write="attention", tau_read=None, tau_write=None, steps=meta.get("steps", 1000),
                        batch_size=meta.get("batch_size", 32), lr=meta.get("lr", 3e-3), seed=r["seed"],
                        curve=curve, final_accuracy=r["final_accuracy"], best_accuracy=max(a for _, a in curve),
                        steps_to_50=steps_to(curve, 0.5), steps_to_90=steps_to(curve, 0.9), stopped_at=None,
                        chance=meta.get("chance", 1 / 16), diagnostics=[], seconds=r["seconds"],
                        train_seconds=r["seconds"], eval_seconds=0.0,
                        without_facts_accuracy=r.get("without_facts_accuracy"),
                        machine="memory_experiment.md", commit=meta.get("commit", "?"),
                        started=meta.get("date", "?"), source="memory_experiment.json"))
    return out


def partial_runs(ckpt_dir: str) -> list[dict]:
    """Runs still in progress (or interrupted): their checkpointed curves, marked partial."""
    if not ckpt_dir or not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in sorted(os.listdir(ckpt_dir)):
        if not name.endswith(".pt"):
            continue
        state = torch.load(os.path.join(ckpt_dir, name), weights_only=False, map_location="cpu")
        cfg = state.get("cfg")
        if cfg is None:  # checkpoints from before cfg was stored: the name says it
            task, c, n, write, seed = name.split("_")[:5]
            cfg = dict(task=task, chunk=int(c[1:]), slots=int(n[1:]), pairs=1, hops=1, model="lm2", write=write,
                       tau_read=10.0 if write.startswith("qknorm") else None,
                       tau_write=10.0 if write.startswith("qknorm") else None, steps=1000, batch_size=32,
                       lr=3e-3, seed=int(seed[1:]))
        curve = [tuple(c) for c in state["curve"]]
        out.append(dict(cfg, curve=curve, final_accuracy=curve[-1][1], best_accuracy=max(a for _, a in curve),
                        steps_to_50=steps_to(curve, 0.5), steps_to_90=steps_to(curve, 0.9), stopped_at=None,
                        chance=1 / 16, diagnostics=state["diagnostics"], seconds=state["seconds"],
                        train_seconds=state["train_seconds"], eval_seconds=state["eval_seconds"],
                        partial_at=state["step"], started="(partial)", machine="(partial)", commit="(partial)",
                        losses=state.get("losses")))
    return out


def report(args) -> int:
    runs = load_runs(args.results) + reference_runs(args.reference)
    partial = partial_runs(args.ckpt_dir)
    if not runs and not partial:
        print(f"no runs in {args.results}", file=sys.stderr)
        return 1
    text = report_text(runs)
    if partial:
        text += ("\n\nIn progress or interrupted (from the checkpoints in " + args.ckpt_dir + "; resumable; steps to "
                 "50/90 % counted only up to the last checkpoint):\n\n" + report_text(partial).split("\n\n")[0])
        runs = runs + partial
    init_runs = load_runs(args.init_results)
    if init_runs:
        text += "\n\nAt initialisation (one batch of " + f"{init_runs[0]['batch_size']}" + ", --init-only; mean over the " \
                "4 memory layers, median over seeds):\n\n" + init_report_text(init_runs)
    write_text_atomic(args.report_md, text + "\n", fsync=False)
    print(text)
    for path in plot(runs, args.plot_prefix):
        print(f"plot: {path}")
    return 0


def configs_of(args):
    """(config, seed) for every model and seed the flags name: the unit a run and a result are."""
    for model_kind in args.models.split(","):
        if model_kind not in MODELS:
            raise SystemExit(f"--models: unknown model {model_kind!r}; known: {', '.join(MODELS)}")
        write = args.write if model_kind == "lm2" else "none"
        base = dict(task=args.task, chunk=args.chunk, slots=resolve_slots(args.slots, args.chunk),
                    pairs=args.pairs if args.task == "mqar" else 1,
                    hops=args.hops if args.task == "persist" else 1, model=model_kind,
                    write=write, **logit_scales(write, args),
                    steps=args.steps, batch_size=args.batch_size, lr=args.lr, adam_eps=args.adam_eps,
                    forget_bias=args.forget_bias, shift=args.shift, init=args.init, qk_init=args.qk_init)
        for seed in (int(s) for s in args.seeds.split(",")):
            yield base, seed


# ------------------------------------------------------------------------------ a plan, in parallel
def plan_jobs(path: str) -> list[list[str]]:
    """One process per (plan line, model, seed), in the plan's order. A line is this tool's flags."""
    import shlex

    jobs = []
    with open(path) as f:
        for number, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            flags = shlex.split(line)
            try:
                args = parse_args(flags)
            except SystemExit:
                raise SystemExit(f"{path}:{number}: not flags of memory_scaling.py: {line!r}") from None
            if args.plan or args.report or args.init_only:
                raise SystemExit(f"{path}:{number}: a plan line trains configs; --plan/--report/--init-only don't belong")
            for model_kind in args.models.split(","):
                for seed in args.seeds.split(","):
                    jobs.append(flags + ["--models", model_kind, "--seeds", seed])
    return jobs


def job_key(flags: list[str]) -> tuple:
    (base, seed), = configs_of(parse_args(flags))  # a job names one model and one seed
    return run_key({**base, "seed": seed})


def run_plan(args) -> int:
    """Run a plan's configs --jobs at a time, each in its own one-thread process (a study on a GPU is
    bound by kernel launches, so processes side by side fill it), skipping finished configs."""
    import signal
    import subprocess

    jobs = plan_jobs(args.plan)
    done = {run_key(r) for r in load_runs(args.results)}
    todo = [j for j in jobs if job_key(j) not in done]
    log_dir = args.log_dir or os.path.join(os.path.dirname(os.path.abspath(args.results)), "memory_study_logs")
    os.makedirs(log_dir, exist_ok=True)
    print(f"plan {args.plan}: {len(jobs)} configs, {len(jobs) - len(todo)} already in {args.results}, "
          f"{len(todo)} to run, {args.jobs} at a time; logs in {log_dir}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    shared = ["--results", args.results, "--ckpt-dir", args.ckpt_dir, "--threads", "1"]
    t0, running, status, stopped = time.time(), {}, [], set()
    pending = list(enumerate(todo))

    def late() -> bool:
        return args.deadline_s is not None and time.time() - t0 >= args.deadline_s

    while pending or running:
        while pending and len(running) < args.jobs and not late():
            index, flags = pending.pop(0)
            log = open(os.path.join(log_dir, f"job{index:03d}.log"), "w")
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *flags, *shared],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            running[proc] = (index, flags, time.time(), log)
        if late():
            for proc in running.keys() - stopped:  # once each; they checkpoint every 100 steps
                proc.terminate()
                stopped.add(proc)
        for proc in [p for p in running if p.poll() is not None]:
            index, flags, started, log = running.pop(proc)
            log.close()
            state = ("done" if proc.returncode == 0 else
                     "stopped at the deadline" if proc in stopped and proc.returncode == -signal.SIGTERM else
                     f"failed (rc {proc.returncode})")
            status.append((index, " ".join(flags), state, time.time() - started))
            print(f"[{time.time() - t0:6.0f}s] job {index}: {state} after {status[-1][3]:.0f}s: {' '.join(flags)}", flush=True)
        if late() and not running:
            break
        time.sleep(0.5)
    not_started = len(pending)
    print("\n| job | config | state | s |\n|---|---|---|---|")
    for index, flags, state, seconds in sorted(status):
        print(f"| {index} | {flags} | {state} | {seconds:.0f} |")
    print(f"{sum(s[2] == 'done' for s in status)} done, {not_started} not started, {time.time() - t0:.0f}s", flush=True)
    return 1 if any(s[2].startswith("failed") for s in status) else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    bad = [w for w in args.write.split(",") if w not in WRITE_MODES]
    if bad or ("," in args.write and not args.init_only):
        raise SystemExit(f"--write {args.write}: expected one of {', '.join(WRITE_MODES)}"
                         + (" (a comma list only with --init-only)" if not bad else ""))
    if args.report:
        return report(args)
    if args.plan:
        return run_plan(args)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from megatron_lm2 import distributed

    own_world = not torch.distributed.is_initialized()  # a test may hold one already
    if own_world:
        distributed.initialize(seed=0)
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    meta = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
                f"{args.threads} thread(s)", commit=_commit())
    if args.init_only:
        diagnose_at_init(args)
        if own_world:
            distributed.destroy()
        return 0
    done = {run_key(r) for r in load_runs(args.results)}
    for base, seed in configs_of(args):
        key = run_key({**base, "seed": seed})
        if key in done:
            print(f"skip {key}: already in {args.results}", flush=True)
            continue
        started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        run = train_one(base, seed, args)
        run.update(meta, started=started, eval_every=args.eval_every, eval_samples=args.eval_samples)
        append_run(args.results, run)
        ckpt = checkpoint_path(args, {**base, "seed": seed})
        if ckpt and os.path.exists(ckpt):
            os.remove(ckpt)
        print(f"[done] {key}: final {run['final_accuracy']:.3f}, to 50% {run['steps_to_50']}, "
              f"to 90% {run['steps_to_90']}, {run['seconds']:.0f}s", flush=True)
    if own_world:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
