"""Where does a trained study model's read look? A probe of one `memory_scaling.py` checkpoint
(one-answer tasks: fact, persist), on the task's held-out batch:

* held-out accuracy per value token (session 10: all or nothing, so curves plateau at k/16);
* per memory layer and head, the read's mass on the fact's key slot and value slot at the answer
  position, split by right / wrong answers (token write: slot i holds token i of the last chunk
  written, so this is for `--write token|qknorm-token` with the question one chunk after the fact);
* the first memory layer's input gate on the value's slot, right / wrong;
* the accuracy with the asked key swapped for one the sample does not hold.

    python benchmarks/memory_probe.py benchmarks/memory_scaling_ckpt/fact_C256_N256_qknorm-token_s0_<hash>.pt

Checkpoints are written every 100 steps while a run trains and removed when it finishes: copy one
aside to probe it later. The numbers of memory_scaling.md's "Session 10" come from this script.
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
    rows = torch.arange(samples)
    hit = logits[rows, answer].argmax(-1) == held.labels[rows, answer]
    key_pos, value_pos = fact_slots(held)
    values = held.tokens[rows, value_pos]
    out = {"step": state["step"], "accuracy": hit.float().mean().item(),
           "by_value": {int(v): hit[values == v].float().mean().item() for v in values.unique().tolist()}}
    for m in mods:
        for name, slots in (("key", key_pos), ("value", value_pos)):
            mass = slot_mass(m.study_read, answer, slots, spec.chunk)
            out[f"layer{m.layer_number}.{name}_mass_right"] = mass[hit].mean(0).tolist() if hit.any() else None
            out[f"layer{m.layer_number}.{name}_mass_wrong"] = mass[~hit].mean(0).tolist() if (~hit).any() else None
    g_value = mods[0].study_gate_in.mean(-1)[rows, value_pos]  # slot = position (token write)
    out["gate_in_value_slot"] = [g_value[hit].mean().item() if hit.any() else None,
                                 g_value[~hit].mean().item() if (~hit).any() else None]
    swapped = with_other_keys(spec, held, ms.EVAL_SEED + 2)
    out["other_key_accuracy"] = ms.accuracy(model, swapped, mask)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--samples", type=int, default=128)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from megatron_lm2 import distributed

    if not torch.distributed.is_initialized():
        distributed.initialize(seed=0)
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
