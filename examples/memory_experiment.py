"""Does the memory carry facts past the attention window? LM2 (debug) against its vanilla twin.

Task: multi-query associative recall across the window (megatron_lm2.eval.mqar). Each
sequence is two attention windows of W tokens. The first holds P key-value pairs among
random filler; the second holds filler and then asks for every key again. Self-attention is
blocked across windows (the model's own mask, megatron_lm2.model.LM2GPTModel), so the only path from the facts
to the questions is the memory bank, written after the first window (memory_chunk_size = W)
and read by the second. The vanilla twin has no such path: it must sit at chance (1/V).

Both models: the `debug` flavor (4 layers, d 128) and `debug-vanilla`, same overrides
(vocabulary = the task's, seq_length = 2W, attention_window = W, memory_chunk_size = W),
same data, same optimizer and steps. One process, a plain AdamW loop, CPU.

    python examples/memory_experiment.py --models debug,debug-vanilla --seeds 0,1,2
    python examples/memory_experiment.py --report            # table + plot from the saved runs

Runs are saved one by one to --results (JSON) and skipped when already there, so an
interrupted experiment resumes; two processes may train different --models side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
from tqdm import tqdm

from megatron_lm2 import distributed
from megatron_lm2.eval.mqar import MQARSpec, mqar_batch
from megatron_lm2.fileio import atomic_path, write_json_atomic
from megatron_lm2.flavors import get_flavor
from megatron_lm2.model import build_model
from megatron_lm2.provenance import git_commit

EVAL_SEED = 123_456  # the held-out batch: the same for every run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="debug,debug-vanilla")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--window", type=int, default=32, help="attention window W; sequences are 2W tokens")
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--values", type=int, default=16, help="value vocabulary: chance = 1/values")
    p.add_argument("--keys", type=int, default=32)
    p.add_argument("--filler", type=int, default=64, help="distinct filler tokens")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default="benchmarks/memory_experiment.json")
    p.add_argument("--plot", default="benchmarks/memory_experiment.png")
    p.add_argument("--heatmap", default="benchmarks/memory_experiment_read_attention.png",
                   help="read-attention heatmap of the first LM2 run after training ('' to skip)")
    p.add_argument("--report", action="store_true", help="only print the table and draw the plot")
    return p.parse_args(argv)


def task_spec(args) -> MQARSpec:
    return MQARSpec(seq_length=2 * args.window, fact_length=args.window, num_pairs=args.pairs,
                    num_keys=args.keys, num_values=args.values, num_filler=args.filler)


def model_config(flavor: str, spec: MQARSpec, window: int):
    return get_flavor(flavor, vocab_size=spec.vocab_size, seq_length=spec.seq_length,
                      attention_window=window, memory_chunk_size=window)


@torch.no_grad()
def accuracy(model, batch) -> float:
    """Exact-match accuracy of the argmax over the whole vocabulary at the answer positions."""
    model.eval()
    pos = torch.arange(batch.tokens.shape[1])[None].expand_as(batch.tokens)
    logits = model(batch.tokens, pos, None)  # the model applies its attention window
    model.train()
    hit = batch.loss_mask.bool()
    return float((logits.argmax(-1)[hit] == batch.labels[hit]).float().mean())


def train_one(flavor: str, seed: int, args, spec: MQARSpec) -> dict:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_model(model_config(flavor, spec, args.window))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    pos = torch.arange(spec.seq_length)[None].expand(args.batch_size, -1)
    data = torch.Generator().manual_seed(10_000 + seed)
    held_out = mqar_batch(spec, args.eval_samples, EVAL_SEED)
    curve, losses = [], []
    start = time.time()
    bar = tqdm(range(args.steps + 1), desc=f"{flavor} seed {seed}", mininterval=10)
    for step in bar:
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, accuracy(model, held_out)))
            bar.set_postfix(acc=f"{curve[-1][1]:.3f}")
            print(f"[{flavor} seed {seed}] step {step} held-out accuracy {curve[-1][1]:.3f} "
                  f"({time.time() - start:.0f}s)", flush=True)
        if step == args.steps:
            break
        batch = mqar_batch(spec, args.batch_size, data)
        per_token = model(batch.tokens, pos, None, labels=batch.labels)
        loss = (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    run = {"flavor": flavor, "seed": seed, "curve": curve, "final_accuracy": curve[-1][1],
           "final_loss": statistics.fmean(losses[-50:]), "seconds": time.time() - start}
    if model.config.has_memory:
        run["without_facts_accuracy"] = ablation_accuracy(model, spec, args, held_out)
        if args.heatmap and seed == min(int(s) for s in args.seeds.split(",")):
            draw_heatmap(model, spec, args, held_out)
    return run


def ablation_accuracy(model, spec, args, held_out) -> float:
    """The same questions with the fact window's pairs replaced by filler: if the trained LM2
    answers from the memory, this falls to chance."""
    tokens = held_out.tokens.clone()
    fact = tokens[:, : args.window]
    is_pair = (fact >= spec.key_ids.start)  # keys and values lie above the filler ids
    g = torch.Generator().manual_seed(EVAL_SEED + 1)
    fact[is_pair] = torch.randint(spec.filler_ids.start, spec.filler_ids.stop, (int(is_pair.sum()),), generator=g)
    ablated = type(held_out)(tokens=tokens, labels=held_out.labels, loss_mask=held_out.loss_mask,
                             values=held_out.values)
    return accuracy(model, ablated)


def draw_heatmap(model, spec, args, held_out) -> None:
    from megatron_lm2.eval.inspect import inspect_memory, plot_read_attention

    tokens = held_out.tokens[:1]
    report = inspect_memory(model, tokens)
    os.makedirs(os.path.dirname(args.heatmap) or ".", exist_ok=True)
    plot_read_attention(report, args.heatmap, title="debug LM2 after training: read attention over slots "
                        "(tokens 0..W-1 read M_0; tokens W.. read the bank written from the fact window)")
    print(f"gate statistics after training: {json.dumps(report.gates)}", flush=True)


# ---------------------------------------------------------------------------------- results
def load_results(path: str) -> dict:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {"runs": []}


def save_run(path: str, run: dict, meta: dict) -> None:
    """Re-read, add, write atomically, under a lock: two processes may share the file."""
    import fcntl

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _add_run(path, run, meta)


def _add_run(path: str, run: dict, meta: dict) -> None:
    results = load_results(path)
    results["runs"] = [r for r in results["runs"] if (r["flavor"], r["seed"]) != (run["flavor"], run["seed"])]
    results["runs"].append(run)
    results["meta"] = meta
    write_json_atomic(path, results, indent=1, fsync=False, unique=True)


def summarize(results: dict, chance: float) -> str:
    by_flavor: dict = {}
    for run in results["runs"]:
        by_flavor.setdefault(run["flavor"], []).append(run)
    lines = ["| model | seeds | final accuracy, mean ± std (%) | per seed (%) | facts removed (%) | s/run |",
             "|---|---|---|---|---|---|"]
    for flavor, runs in sorted(by_flavor.items()):
        runs.sort(key=lambda r: r["seed"])
        acc = [100 * r["final_accuracy"] for r in runs]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        ablated = [100 * r["without_facts_accuracy"] for r in runs if "without_facts_accuracy" in r]
        lines.append(f"| {flavor} | {len(runs)} | {statistics.fmean(acc):.1f} ± {spread:.1f} | "
                     + ", ".join(f"{a:.1f}" for a in acc) + " | "
                     + (", ".join(f"{a:.1f}" for a in ablated) if ablated else "n/a") + " | "
                     + f"{statistics.fmean(r['seconds'] for r in runs):.0f} |")
    lines.append(f"\nchance = 1/{round(1 / chance)} = {100 * chance:.2f}%")
    return "\n".join(lines)


def plot(results: dict, path: str, chance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"debug": "tab:blue", "debug-vanilla": "tab:orange"}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for flavor in sorted({r["flavor"] for r in results["runs"]}):
        runs = [r for r in results["runs"] if r["flavor"] == flavor]
        for i, run in enumerate(sorted(runs, key=lambda r: r["seed"])):
            steps, acc = zip(*run["curve"])
            ax.plot(steps, [100 * a for a in acc], color=colors.get(flavor), alpha=0.8,
                    label=f"{flavor} ({len(runs)} seeds)" if i == 0 else None)
    ax.axhline(100 * chance, color="gray", linestyle="--", label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out recall accuracy (%)")
    meta = results.get("meta", {})
    ax.set_title(f"recall beyond the attention window (W={meta.get('window')}, pairs={meta.get('pairs')})")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png", fsync=False) as tmp:
        fig.savefig(tmp, dpi=120)
        plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = task_spec(args)
    if args.report:
        results = load_results(args.results)
        if not results["runs"]:
            print(f"no runs in {args.results}", file=sys.stderr)
            return 1
        print(summarize(results, spec.chance))
        plot(results, args.plot, spec.chance)
        print(f"plot: {args.plot}")
        return 0
    torch.set_num_threads(args.threads)
    if "MASTER_PORT" not in os.environ:  # several of these may run on one machine
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    distributed.initialize(seed=0)
    meta = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "warmup", "window", "pairs", "values",
                                          "keys", "filler", "eval_samples")}
    meta.update(machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                f"{args.threads} thread(s)", date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=git_commit(), chance=spec.chance)
    done = {(r["flavor"], r["seed"]) for r in load_results(args.results)["runs"]}
    for seed in (int(s) for s in args.seeds.split(",")):
        for flavor in args.models.split(","):
            if (flavor, seed) in done:
                print(f"skip {flavor} seed {seed}: already in {args.results}")
                continue
            run = train_one(flavor, seed, args, spec)
            save_run(args.results, run, meta)
            print(f"[{flavor} seed {seed}] final accuracy {run['final_accuracy']:.3f} "
                  f"in {run['seconds']:.0f}s" + (f", facts removed {run['without_facts_accuracy']:.3f}"
                                                 if "without_facts_accuracy" in run else ""), flush=True)
    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
