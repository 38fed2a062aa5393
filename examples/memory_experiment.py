"""Does the memory carry a fact past the attention window? An LM2 against its vanilla twin.

Task (megatron_lm2.eval.memory_tasks, "fact" by default): each sequence is two chunks of C
tokens. Chunk 0 holds one key-value pair among random filler; chunk 1 holds filler and asks
for the key at its end; the model must predict the value. Self-attention is blocked across
chunks (attention_window = C, the model's own mask), so the only path from the fact to the
question is the memory bank, written after chunk 0 (memory_chunk_size = C) and read by chunk 1.
The vanilla twin has no such path: it must sit at chance (1 / 16).

Both models are built by the library as they are (megatron_lm2.flavors, model.build_model),
with the task's vocabulary, seq_length = 2C, attention_window = C, memory_chunk_size = C (and
N = C for the flavors whose memory needs it: the recipes' token write). Same data, same
optimizer and steps; one process, a plain AdamW loop, CPU.

    python examples/memory_experiment.py                        # lm2-debug vs debug-vanilla, seeds 0-2
    python examples/memory_experiment.py --seeds 0 --check      # exit 3 unless LM2 >= 90 % and vanilla at chance
    python examples/memory_experiment.py --report               # table + plot from the saved runs

The default is the recipes' memory (`lm2-debug`: token write, N = C, qk-norm read, write shift
1, forget bias 3, tied keys) at lr 1e-3. benchmarks/memory_experiment.md also records the
paper's attention write (`--models debug,debug-vanilla --lr 3e-3`, 1000 steps).
Runs are saved one by one to --results (JSON) and skipped when already there with the same
settings, so an interrupted experiment resumes; two processes may train different --models
side by side. After training, the first LM2 run draws its read attention (--heatmap) with the
fact's slot marked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
from tqdm import tqdm

from megatron_lm2 import distributed
from megatron_lm2.eval.memory_tasks import TaskBatch, TaskSpec, make_batch, with_other_keys, without_facts
from megatron_lm2.fileio import atomic_path, write_json_atomic
from megatron_lm2.flavors import get_flavor
from megatron_lm2.model import build_model
from megatron_lm2.provenance import git_commit

EVAL_SEED = 123_456  # the held-out batch: the same for every run, drawn apart from the training stream
TASKS = ("fact", "mqar")  # one chunk of facts, questions in the next: what --heatmap can mark
SETTINGS = ("task", "steps", "batch_size", "lr", "warmup", "window", "pairs", "values", "keys", "filler",
            "eval_samples")  # a saved run is reused only if these match
EXIT_MISSED = 3  # --check: the run finished but missed its target (2 stays the CLI's bad input)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lm2-debug,debug-vanilla", help="flavors, comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="each sets the initial weights and the training stream")
    p.add_argument("--task", default="fact", choices=TASKS,
                   help="fact: one pair in chunk 0; mqar: --pairs pairs, every key asked")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--window", type=int, default=32, help="C: attention window = memory chunk; sequences are 2C")
    p.add_argument("--pairs", type=int, default=1, help="mqar: key-value pairs in chunk 0")
    p.add_argument("--values", type=int, default=16, help="value vocabulary: chance = 1/values")
    p.add_argument("--keys", type=int, default=32)
    p.add_argument("--filler", type=int, default=64, help="distinct filler tokens")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default="benchmarks/memory_experiment_recipe.json")
    p.add_argument("--plot", default="benchmarks/memory_experiment_recipe.png")
    p.add_argument("--heatmap", default="benchmarks/memory_experiment_recipe_read_attention.png",
                   help="read attention of the first LM2 run after training, the fact's slot marked ('' to skip)")
    p.add_argument("--target", type=float, default=0.9, help="--check: the LM2 runs' held-out recall at least this")
    p.add_argument("--check", action="store_true",
                   help=f"after training, print each run's recall against its target and exit {EXIT_MISSED} if "
                        "an LM2 run is below --target or a vanilla run above chance + 4 standard errors")
    p.add_argument("--report", action="store_true", help="only print the table and draw the plot")
    args = p.parse_args(argv)
    if args.task == "fact" and args.pairs != 1:
        p.error("--pairs: the fact task has one pair (use --task mqar)")
    return args


def task_spec(args) -> TaskSpec:
    return TaskSpec(name=args.task, chunk=args.window, pairs=args.pairs, num_keys=args.keys,
                    num_values=args.values, num_filler=args.filler)


def model_config(flavor: str, task: TaskSpec):
    sizes = dict(vocab_size=task.vocab_size, seq_length=task.seq_length, attention_window=task.chunk,
                 memory_chunk_size=task.chunk)
    base = get_flavor(flavor)
    if base.has_memory and base.memory_slots == base.memory_chunk_size:  # N = C (the token write needs it)
        sizes["memory_slots"] = task.chunk
    return get_flavor(flavor, **sizes)


def settings(args) -> dict:
    return {k: getattr(args, k) for k in SETTINGS}


@torch.no_grad()
def accuracy(model, batch: TaskBatch) -> float:
    """Exact-match accuracy of the argmax over the whole vocabulary at the answer positions."""
    model.eval()
    pos = torch.arange(batch.tokens.shape[1])[None].expand_as(batch.tokens)
    logits = model(batch.tokens, pos, None)  # the model applies its attention window
    model.train()
    hit = batch.loss_mask.bool()
    return float((logits.argmax(-1)[hit] == batch.labels[hit]).float().mean())


def train_one(flavor: str, seed: int, args, task: TaskSpec) -> dict:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_model(model_config(flavor, task))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    pos = torch.arange(task.seq_length)[None].expand(args.batch_size, -1)
    data = torch.Generator().manual_seed(10_000 + seed)
    held_out = make_batch(task, args.eval_samples, EVAL_SEED)
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
        batch = make_batch(task, args.batch_size, data)
        per_token = model(batch.tokens, pos, None, labels=batch.labels)
        loss = (per_token * batch.loss_mask).sum() / batch.loss_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    run = {"flavor": flavor, "seed": seed, "settings": settings(args), "has_memory": model.config.has_memory,
           "curve": curve, "final_accuracy": curve[-1][1], "final_loss": statistics.fmean(losses[-50:]),
           "seconds": time.time() - start}
    if model.config.has_memory:
        # The same questions with the facts replaced by filler: answered from the bank, this falls
        # to chance. With another key asked: one fact needs no key (one value in the bank), many do.
        run["without_facts_accuracy"] = accuracy(model, without_facts(task, held_out, EVAL_SEED + 1))
        run["other_key_accuracy"] = accuracy(model, with_other_keys(task, held_out, EVAL_SEED + 2))
        if args.heatmap and seed == min(seeds(args)):
            run["read"] = draw_read_attention(model, task, held_out, args.heatmap,
                                              f"{flavor} after {args.steps} steps, seed {seed}")
    return run


# ----------------------------------------------------------------------- the read, pictured
def question_and_fact_slots(task: TaskSpec, batch: TaskBatch, sample: int = 0) -> tuple[int, list[int]]:
    """The first question's position in `sample`, and the slots that hold its answer's pair: the
    memory's token write puts token i of chunk 0 into slot i, and the write shift adds the token
    before it, so the value's slot holds the key and the value."""
    question = int(batch.loss_mask[sample].nonzero()[0, 0])
    answer = int(batch.labels[sample, question])
    chunk0 = batch.tokens[sample, : task.chunk]
    return question, (chunk0 == answer).nonzero()[:, 0].tolist()


SHADES = " .:-=+*#%@"  # the text picture's ramp: a slot's share of the row's largest weight


def text_picture(p: torch.Tensor, rows: slice, question: int, fact_slots: list[int]) -> str:
    """One head's read attention [S, N] as text: a row per token of the question's chunk (every
    4th, and the question's), a column per slot, shaded by weight / the row's largest; the fact's
    slots marked under the grid. For a terminal, where the PNG cannot be seen."""
    num_slots = p.shape[-1]
    lines = []
    for t in range(rows.start, rows.stop):
        if t != question and (t - rows.start) % 4:
            continue
        row = p[t] / p[t].max().clamp_min(1e-12)
        cells = "".join(SHADES[min(len(SHADES) - 1, int(v * len(SHADES)))] for v in row.tolist())
        lines.append(f"  token {t:4d} {'>' if t == question else ' '}|{cells}|")
    marks = "".join("^" if s in fact_slots else " " for s in range(num_slots))
    lines.append(f"  {'fact slot':<11}|{marks}|")
    return "\n".join(lines)


def draw_read_attention(model, task: TaskSpec, held_out: TaskBatch, path: str, title: str) -> dict:
    """Read attention over the slots of the question's chunk, one panel per memory layer and head,
    the fact's slot and the question's row marked in red; returns where the question's read went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_lm2.eval.inspect import inspect_memory

    report = inspect_memory(model, held_out.tokens[:1])
    question, fact_slots = question_and_fact_slots(task, held_out)
    C = task.chunk
    rows = slice(question // C * C, question // C * C + C)  # the question's chunk reads the written bank
    layers = sorted(report.attention)
    heads = report.attention[layers[0]].shape[1]
    num_slots = report.attention[layers[0]].shape[-1]
    fig, axes = plt.subplots(len(layers), heads, figsize=(2.3 * heads + 1, 2.2 * len(layers) + 1),
                             squeeze=False, constrained_layout=True)
    best = {"mass": -1.0}
    for r, layer in enumerate(layers):
        p = report.attention[layer][0].float()  # [H, S, N]
        for h in range(heads):
            on_fact = float(p[h, question, fact_slots].sum())
            if on_fact > best["mass"]:
                best = {"layer": layer, "head": h, "mass": on_fact, "top_slot": int(p[h, question].argmax())}
            ax = axes[r][h]
            ax.imshow(p[h, rows].numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                      vmin=0.0, vmax=1.0, extent=(-0.5, num_slots - 0.5, rows.stop - 0.5, rows.start - 0.5))
            for s in fact_slots:
                ax.add_patch(matplotlib.patches.Rectangle((s - 0.5, rows.start - 0.5), 1, C, fill=False,
                                                          edgecolor="red", linewidth=0.8))
            ax.annotate("", xy=(-0.5, question), xytext=(-4, question), annotation_clip=False,
                        arrowprops=dict(arrowstyle="->", color="red", lw=1.2))
            ax.set_title(f"layer {layer}, head {h}: {on_fact:.2f} on the fact", fontsize=7)
            ax.set_xlabel("slot", fontsize=6)
            ax.set_ylabel("token", fontsize=6)
            ax.tick_params(labelsize=5)
    correct = accuracy(model, TaskBatch(*(t[:1] for t in (held_out.tokens, held_out.labels,
                                                            held_out.loss_mask, held_out.fact_mask)))) == 1.0
    fig.suptitle(f"{title}: read attention of tokens {rows.start}-{rows.stop - 1} over the {num_slots} slots "
                 f"written from chunk 0\nred box: slot {', '.join(map(str, fact_slots))} (holds the key-value "
                 f"pair); arrow: the question's token (answered {'right' if correct else 'wrong'}); "
                 f"uniform = {1 / num_slots:.3f}", fontsize=8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_path(path, suffix=".png", fsync=False) as tmp:
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
    print(text_picture(report.attention[best["layer"]][0, best["head"]].float(), rows, question, fact_slots),
          flush=True)
    print(f"[read] the question (token {question}) reads the fact's slot {fact_slots} with up to "
          f"{best['mass']:.2f} of its mass (layer {best['layer']}, head {best['head']}; uniform "
          f"{1 / num_slots:.3f}); picture: {path}", flush=True)
    print(f"gate statistics after training: {json.dumps(report.gates)}", flush=True)
    return dict(best, question=question, fact_slots=fact_slots, slots=num_slots, picture=path,
                sample_answered=correct)


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


def seeds(args) -> list[int]:
    return [int(s) for s in args.seeds.split(",")]


def summarize(results: dict, chance: float) -> str:
    by_flavor: dict = {}
    for run in results["runs"]:
        by_flavor.setdefault(run["flavor"], []).append(run)
    lines = ["| model | seeds | final accuracy, mean ± std (%) | per seed (%) | facts removed (%) | other key (%) "
             "| s/run |", "|---|---|---|---|---|---|---|"]

    def column(runs, key):
        values = [f"{100 * r[key]:.1f}" for r in runs if key in r]
        return ", ".join(values) if values else "n/a"

    for flavor, runs in sorted(by_flavor.items()):
        runs.sort(key=lambda r: r["seed"])
        acc = [100 * r["final_accuracy"] for r in runs]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(f"| {flavor} | {len(runs)} | {statistics.fmean(acc):.1f} ± {spread:.1f} | "
                     + ", ".join(f"{a:.1f}" for a in acc) + f" | {column(runs, 'without_facts_accuracy')} | "
                     f"{column(runs, 'other_key_accuracy')} | {statistics.fmean(r['seconds'] for r in runs):.0f} |")
    lines.append(f"\nchance = 1/{round(1 / chance)} = {100 * chance:.2f}%")
    return "\n".join(lines)


def verdict(runs: list[dict], task: TaskSpec, args) -> list[tuple[bool, str]]:
    """Each run's held-out recall against its target: an LM2 at least --target, a vanilla twin
    within 4 standard errors of chance (a binomial over the held-out answers)."""
    answers = args.eval_samples * (args.pairs if args.task == "mqar" else 1)
    ceiling = task.chance + 4 * math.sqrt(task.chance * (1 - task.chance) / answers)
    out = []
    for run in sorted(runs, key=lambda r: (not r["has_memory"], r["flavor"], r["seed"])):
        acc = run["final_accuracy"]
        name = f"{run['flavor']} seed {run['seed']}"
        if run["has_memory"]:
            removed = run.get("without_facts_accuracy")
            extra = f", facts removed {100 * removed:.1f} %" if removed is not None else ""
            out.append((acc >= args.target, f"{name:<24} {100 * acc:5.1f} %   target >= {100 * args.target:.0f} %"
                        f"{extra}"))
        else:
            out.append((acc <= ceiling, f"{name:<24} {100 * acc:5.1f} %   target: chance, <= {100 * ceiling:.1f} %"
                        " (chance + 4 standard errors)"))
    return out


def print_verdict(results: dict, task: TaskSpec, args) -> bool:
    runs = [r for r in results["runs"] if r["flavor"] in args.models.split(",") and r["seed"] in seeds(args)]
    lines = verdict(runs, task, args)
    print(f"[memory] a fact beyond the attention window (C = {task.chunk}): held-out recall on "
          f"{args.eval_samples} questions after {args.steps} steps, chance {100 * task.chance:.1f} %")
    for ok, line in lines:
        print(f"[memory]   {line}: {'met' if ok else 'MISSED'}")
    missed = [line for ok, line in lines if not ok]
    if missed:
        banner = "!" * 100
        print(f"{banner}\n[memory] TARGET MISSED: {len(missed)} run(s) above: the memory did not show "
              f"what it is for in {args.steps} steps\n{banner}", flush=True)
        print(f"[memory] TARGET MISSED: {'; '.join(' '.join(m.split()) for m in missed)}", file=sys.stderr)
    return not missed


def plot(results: dict, path: str, chance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"debug": "tab:blue", "lm2-debug": "tab:green", "debug-vanilla": "tab:orange"}
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
    ax.set_title(f"recall beyond the attention window (C={meta.get('window')}, pairs={meta.get('pairs')})")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png", fsync=False) as tmp:
        fig.savefig(tmp, dpi=120)
        plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    task = task_spec(args)
    if args.report:
        results = load_results(args.results)
        if not results["runs"]:
            print(f"no runs in {args.results}", file=sys.stderr)
            return 1
        print(summarize(results, task.chance))
        plot(results, args.plot, task.chance)
        print(f"plot: {args.plot}")
        return 0
    torch.set_num_threads(args.threads)
    if "MASTER_PORT" not in os.environ:  # several of these may run on one machine
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    distributed.initialize(seed=0)
    meta = settings(args)
    meta.update(machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                f"{args.threads} thread(s)", date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=git_commit(), chance=task.chance)
    done = {(r["flavor"], r["seed"]) for r in load_results(args.results)["runs"] if r.get("settings") == settings(args)}
    for seed in seeds(args):
        for flavor in args.models.split(","):
            if (flavor, seed) in done:
                print(f"skip {flavor} seed {seed}: already in {args.results} with these settings")
                continue
            run = train_one(flavor, seed, args, task)
            save_run(args.results, run, meta)
            print(f"[{flavor} seed {seed}] final accuracy {run['final_accuracy']:.3f} "
                  f"in {run['seconds']:.0f}s" + (f", facts removed {run['without_facts_accuracy']:.3f}"
                                                 if "without_facts_accuracy" in run else ""), flush=True)
    distributed.destroy()
    if args.check and not print_verdict(load_results(args.results), task, args):
        return EXIT_MISSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
