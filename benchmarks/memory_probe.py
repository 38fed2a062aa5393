"""Where does a trained study model's read look? A probe of one `memory_scaling.py` checkpoint
(one-answer tasks: fact, persist), on the task's held-out batch:

* held-out accuracy per value token (the runs of 2026-12-03 (4d2add7): all or nothing, so curves plateau at k/16);
* per memory layer and head, the read's mass on the fact's key slot and value slot at the answer
  position, split by right / wrong answers (token write: slot i holds token i of the last chunk
  written, so this is for `--write token|qknorm-token` with the question one chunk after the fact);
* the first memory layer's input gate on the value's slot, right / wrong;
* the accuracy with the asked key swapped for one the sample does not hold.

    python benchmarks/memory_probe.py benchmarks/memory_scaling_ckpt/fact_C256_N256_qknorm-token_s0_<hash>.pt
    python benchmarks/memory_probe.py --at-init 32,128,256,512   # the read at initialisation, by W_K init

Checkpoints are written every 100 steps while a run trains and removed when it finishes: copy one
aside to probe it later. The numbers of memory_scaling.md's "Runs of 2026-12-03 (4d2add7)" come from this script.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import memory_scaling as ms  # noqa: E402
from megatron_lm2.eval.memory_tasks import TaskBatch, make_batch, with_other_keys  # noqa: E402


def slot_mass(read: torch.Tensor, answer_pos: torch.Tensor, slots: torch.Tensor, chunk: int) -> torch.Tensor:
    """read [B, h, c, N] (the last chunk's read weights), answer_pos [B] absolute positions inside
    that chunk's span, slots [B] slot indices: each row's mass on its slot, per head [B, h]."""
    rows = torch.arange(read.shape[0])
    at_answer = read[rows, :, answer_pos % chunk, :]  # [B, h, N]
    return at_answer[rows, :, slots]


def fact_slots(batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(key position, value position) of each row's single fact in chunk 0."""
    where = torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens)
    key = torch.where(batch.fact_mask, where, batch.tokens.shape[1]).amin(1)
    return key, key + 1


def read_on_fact(model, spec, held: TaskBatch):
    """One forward of a study model (token write) on `held`: its logits, the answer positions, and
    per memory layer the read's mass at the answer on the fact's key slot and value slot, each
    [B, heads]. Runs of 2026-12-06 (097fc56) reads it at initialisation: with --qk-init tied and --shift 1 the value's
    slot starts at 10-60x the uniform 1/N (independent init: ~1x)."""
    from megatron_lm2.model import attention_mask

    mask = attention_mask(spec.seq_length, spec.chunk, "cpu")
    mods = [m for m in ms.memory_modules(model) if hasattr(m, "study_write")]
    for m in mods:
        m.study_keep = True
    model.eval()
    try:
        with torch.no_grad():
            logits = ms._forward(model, held, mask)
    finally:
        for m in mods:
            m.study_keep = False
    answer = held.loss_mask.argmax(1)
    key_pos, value_pos = fact_slots(held)
    mass = {m.layer_number: (slot_mass(m.study_read, answer, key_pos, spec.chunk),
                             slot_mass(m.study_read, answer, value_pos, spec.chunk)) for m in mods}
    return logits, answer, mass


def probe(path: str, samples: int = 128) -> dict:
    state = torch.load(path, weights_only=False, map_location="cpu")
    cfg = state["cfg"]
    if not cfg["write"].endswith("token") or cfg["task"] not in ("fact", "persist") or cfg.get("hops", 1) != 1:
        raise SystemExit(f"{path}: the probe reads slot = position, so it needs a token write and the "
                         f"question one chunk after the fact (got write {cfg['write']}, task {cfg['task']})")
    model, spec = ms.build(cfg, cfg["seed"])
    model.load_state_dict(state["model"])
    from megatron_lm2.model import attention_mask

    held = make_batch(spec, samples, ms.EVAL_SEED)
    mask = attention_mask(spec.seq_length, spec.chunk, "cpu")
    mods = [m for m in ms.memory_modules(model) if hasattr(m, "study_write")]
    logits, answer, mass = read_on_fact(model, spec, held)
    rows = torch.arange(samples)
    hit = logits[rows, answer].argmax(-1) == held.labels[rows, answer]
    key_pos, value_pos = fact_slots(held)
    values = held.tokens[rows, value_pos]
    out = {"step": state["step"], "accuracy": hit.float().mean().item(),
           "by_value": {int(v): hit[values == v].float().mean().item() for v in values.unique().tolist()}}
    for layer, pair in mass.items():
        for name, on_slot in zip(("key", "value"), pair):
            out[f"layer{layer}.{name}_mass_right"] = on_slot[hit].mean(0).tolist() if hit.any() else None
            out[f"layer{layer}.{name}_mass_wrong"] = on_slot[~hit].mean(0).tolist() if (~hit).any() else None
    g_value = mods[0].study_gate_in.mean(-1)[rows, value_pos]  # slot = position (token write)
    out["gate_in_value_slot"] = [g_value[hit].mean().item() if hit.any() else None,
                                 g_value[~hit].mean().item() if (~hit).any() else None]
    swapped = with_other_keys(spec, held, ms.EVAL_SEED + 2)
    out["other_key_accuracy"] = ms.accuracy(model, swapped, mask)
    return out


def mass_at_init(chunk: int, qk_init: str, shift: int, samples: int = 64, seed: int = 0) -> list:
    """Per memory layer, the read's mean mass at the answer on the value's and the key's slot, times N
    (1 = uniform), of a freshly built one-fact study model (qknorm-token, N = C, forget bias 3)."""
    cfg = dict(task="fact", chunk=chunk, slots=chunk, pairs=1, hops=1, model="lm2", write="qknorm-token",
               tau_read=10.0, tau_write=None, shift=shift, forget_bias=3.0, qk_init=qk_init)
    model, spec = ms.build(cfg, seed)
    _, _, mass = read_on_fact(model, spec, make_batch(spec, samples, ms.EVAL_SEED))
    return [(float(value.mean()) * chunk, float(key.mean()) * chunk) for key, value in mass.values()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--at-init", metavar="C,C,...",
                   help="no checkpoint: the read's mass on the value / key slot at initialisation (x N) for "
                        "these chunk sizes, independent vs tied W_K, write shift 0 and 1")
    args = p.parse_args(argv)
    if not args.checkpoint and not args.at_init:
        p.error("give a checkpoint, or --at-init C,C,...")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from megatron_lm2 import distributed

    if not torch.distributed.is_initialized():
        distributed.initialize(seed=0)
    if args.at_init:
        print("| C | W_K init | shift | value slot / key slot mass x N, layers 1..L |\n|---|---|---|---|")
        for chunk in (int(c) for c in args.at_init.split(",")):
            for qk_init in ("independent", "tied"):
                for shift in (0, 1):
                    layers = mass_at_init(chunk, qk_init, shift, min(args.samples, 64))
                    print(f"| {chunk} | {qk_init} | {shift} | " + "  ".join(f"{v:.1f} / {k:.1f}" for v, k in layers)
                          + " |", flush=True)
        return 0
    r = probe(args.checkpoint, args.samples)
    print(f"{args.checkpoint}: step {r['step']}, held-out accuracy {100 * r['accuracy']:.1f} %, "
          f"with another key asked {100 * r['other_key_accuracy']:.1f} %")
    learned = sum(a >= 0.9 for a in r["by_value"].values())
    print(f"values at >= 90 %: {learned} of {len(r['by_value'])}; by value: "
          + ", ".join(f"{v}: {100 * a:.0f}" for v, a in sorted(r["by_value"].items())))
    print("read mass at the answer, per head (right answers | wrong answers):")
    for k in sorted(k for k in r if k.endswith("_mass_right")):
        fmt = lambda x: "-" if x is None else " ".join(f"{y:.2f}" for y in x)  # noqa: E731
        print(f"  {k[:-6]:<22} {fmt(r[k])} | {fmt(r[k.replace('_right', '_wrong')])}")
    right, wrong = r["gate_in_value_slot"]
    print(f"first memory layer's input gate on the value slot: right {right}, wrong {wrong}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
