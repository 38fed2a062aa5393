"""`lm2-sweep plan`: the sweep file -> the run list (plan.json), every run's budget from the
executed-FLOP accounting.

Run groups:
  isoflop       at each budget C, every ladder rung of each family with
                D = C / flops_per_token(config) tokens (tokens-per-parameter within range)
  tokens        [[token_sweep]]: one rung, several token counts
  memory:<axis> [[memory_sweep]]: one LM2 rung, one memory axis varied, fixed tokens

Per run: batch and LR from the rule (rules.py), steps = tokens / (batch x seq) rounded to a
whole number of evaluation intervals, tokens and compute recomputed from the rounded steps
(compute = flops_per_token x tokens exactly), and a layout (layout.py). Runs with too few
steps or no layout are dropped, each with its reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_lm2.accounting import flops_per_token, num_parameters
from megatron_lm2.scaling import ladder, rules
from megatron_lm2.scaling.layout import Layout, NoLayout, search_layout
from megatron_lm2.scaling.sweepfile import SweepSpec, load_sweep
from megatron_lm2.scaling.util import atomic_write_text

PLAN_FILE = "plan.json"
PLAN_VERSION = 1


@dataclass
class Run:
    id: str
    group: str  # isoflop | tokens | memory:<axis>
    family: str
    rung: int
    flavor: str
    overrides: dict
    budget: Optional[float]  # the target compute (isoflop), else None
    axis_value: Optional[str]  # memory sweeps: the value of the swept axis
    tokens: int
    steps: int
    global_batch_size: int
    lr: float
    min_lr: float
    warmup_iters: int
    decay_style: str
    wsd_decay_iters: Optional[int]
    eval_interval: int
    flops_per_token: float
    compute: float  # flops_per_token x tokens
    parameters: dict  # total / base / memory / embedding / decoder / non_embedding
    layout: dict
    run_dir: str
    args: List[str] = field(default_factory=list)  # lm2-train flags (no launcher)

    @property
    def gpu_hours(self) -> Optional[float]:
        hours = self.layout.get("hours")
        return None if hours is None else hours * self.layout["nodes"] * self.layout["gpus_per_node"]


@dataclass
class Dropped:
    id: str
    reason: str


@dataclass
class SweepPlan:
    name: str
    sweep_file: str
    out: str
    spec: dict
    runs: List[Run]
    dropped: List[Dropped]

    def to_json(self) -> str:
        return json.dumps(dict(version=PLAN_VERSION, name=self.name, sweep_file=self.sweep_file, out=self.out,
                               spec=self.spec, runs=[dataclasses.asdict(r) for r in self.runs],
                               dropped=[dataclasses.asdict(d) for d in self.dropped]), indent=1)


def _fmt(x: float) -> str:
    """1e18 -> '1e18', 3e18 -> '3e18', 2.5e9 -> '2.5e9' (run ids)."""
    mantissa, exponent = f"{x:.3g}".split("e") if "e" in f"{x:.3g}" else (f"{x:.3g}", "0")
    return f"{mantissa}e{int(exponent)}"


def _parameters(config) -> dict:
    count = num_parameters(config)
    return dict(count.as_dict(), non_embedding=count.total - count.embedding)


def make_run(spec: SweepSpec, rung: ladder.Rung, run_id: str, group: str, tokens_target: float,
             budget: Optional[float] = None, axis_value: Optional[str] = None) -> Run:
    """One run; raises NoLayout (with the reason) if it cannot be run."""
    schedule, seq = spec.schedule, spec.model.seq_length
    config = rung.config()
    fpt = flops_per_token(config, seq)
    batch, lr = rules.batch_and_lr(schedule, config, seq, tokens_target)
    steps = tokens_target / (batch * seq)
    if steps < schedule.min_steps:
        raise NoLayout(f"{steps:.1f} steps at batch {batch} x {seq} tokens (< min_steps {schedule.min_steps})")
    eval_interval = max(1, round(steps / schedule.evals_per_run))
    steps = max(1, round(steps / eval_interval)) * eval_interval
    tokens = steps * batch * seq
    warmup = max(schedule.min_warmup_iters, round(schedule.warmup_fraction * steps))
    wsd = max(1, round(schedule.wsd_decay_fraction * steps)) if schedule.decay_style == "WSD" else None
    if warmup >= steps or (wsd is not None and warmup + wsd > steps):
        raise NoLayout(f"warmup {warmup} (+ WSD decay {wsd}) steps do not fit in {steps} steps")
    compute = fpt * tokens
    train_kwargs = _train_kwargs(spec, rung, steps, lr, warmup, wsd, eval_interval, run_id)
    layout, _ = search_layout(train_kwargs, config.num_layers, batch, compute, spec.cluster)
    run_dir = os.path.join(spec.out, "runs", run_id)
    run = Run(id=run_id, group=group, family=rung.family, rung=rung.value, flavor=rung.flavor,
              overrides={k: (list(v) if isinstance(v, tuple) else v) for k, v in rung.overrides.items()},
              budget=budget, axis_value=axis_value, tokens=tokens, steps=steps, global_batch_size=batch, lr=lr,
              min_lr=lr * schedule.min_lr_ratio, warmup_iters=warmup, decay_style=schedule.decay_style,
              wsd_decay_iters=wsd, eval_interval=eval_interval, flops_per_token=fpt, compute=compute,
              parameters=_parameters(config), layout=dataclasses.asdict(layout), run_dir=run_dir)
    run.args = train_flags(spec, rung, run, layout)
    return run


def _train_kwargs(spec, rung, steps, lr, warmup, wsd, eval_interval, run_id) -> dict:
    """TrainConfig fields for the layout search (the dry-run planner reads a TrainConfig)."""
    overrides = {k: (list(v) if isinstance(v, tuple) else v) for k, v in rung.overrides.items()}
    kwargs = dict(flavor=rung.flavor, **overrides, train_iters=steps, lr=lr,
                  min_lr=lr * spec.schedule.min_lr_ratio, lr_warmup_iters=warmup, mock_data=True)
    if wsd is not None:
        _check_wsd()
        kwargs.update(lr_decay_style="WSD", lr_wsd_decay_iters=wsd)
    else:
        kwargs.update(lr_decay_style=spec.schedule.decay_style)
    return kwargs


def _check_wsd() -> None:
    from megatron_lm2.scaling.sweepfile import SweepFileError
    from megatron_lm2.training.config import LR_DECAY_STYLES, TrainConfig

    if "WSD" not in LR_DECAY_STYLES or "lr_wsd_decay_iters" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise SweepFileError("[schedule] decay_style: this lm2-train has no WSD schedule "
                             f"(--lr-decay-style choices: {', '.join(LR_DECAY_STYLES)})")


def train_flags(spec: SweepSpec, rung: ladder.Rung, run: Run, layout: Layout) -> List[str]:
    """lm2-train's flags for this run: the rung's model flags, the layout, the schedule, the
    data and the run directory (checkpoints, metrics.jsonl)."""
    s, data = spec.schedule, spec.data
    args = rung.flags()
    args += ["--tensor-model-parallel-size", str(layout.tp), "--pipeline-model-parallel-size", str(layout.pp),
             "--micro-batch-size", str(layout.micro_batch_size), "--global-batch-size", str(run.global_batch_size),
             "--train-iters", str(run.steps), "--lr", f"{run.lr:.6g}", "--min-lr", f"{run.min_lr:.6g}",
             "--lr-warmup-iters", str(run.warmup_iters)]
    args += decay_flags(run)
    args += ["--weight-decay", f"{s.weight_decay:g}", "--clip-grad", f"{s.clip_grad:g}", "--seed", str(s.seed)]
    if spec.cluster.bf16:
        args.append("--bf16")
    if data.mock_data:
        args.append("--mock-data")
    else:
        args += ["--data-path", *data.data_path, "--data-cache-path", os.path.join(spec.out, "data_cache")]
    if data.tokenizer:
        args += ["--tokenizer", data.tokenizer]
    args += ["--split", data.split, "--save", run.run_dir, "--save-interval", str(max(run.eval_interval, run.steps // 5)),
             "--keep-last", "1", "--log-interval", str(min(s.log_interval, run.eval_interval)),
             "--eval-interval", str(run.eval_interval), "--eval-iters", str(s.eval_iters)]
    return args


def decay_flags(run: Run) -> List[str]:
    if run.decay_style != "WSD":
        return ["--lr-decay-style", run.decay_style]
    return ["--lr-decay-style", "WSD", WSD_DECAY_FLAG, str(run.wsd_decay_iters)]


WSD_DECAY_FLAG = "--lr-wsd-decay-iters"


# ------------------------------------------------------------------------------------ grids
def build_plan(spec: SweepSpec) -> SweepPlan:
    runs: List[Run] = []
    dropped: List[Dropped] = []

    def add(rung, run_id, group, tokens, budget=None, axis_value=None):
        try:
            runs.append(make_run(spec, rung, run_id, group, tokens, budget, axis_value))
        except NoLayout as reason:
            dropped.append(Dropped(run_id, str(reason)))

    m, lad, mem = spec.model, spec.ladder, spec.memory
    tag = "w" if lad.knob == "width" else "L"
    if spec.isoflop:
        iso = spec.isoflop
        for budget in iso.budgets:
            for family in iso.families:
                for value in lad.values:
                    rung = ladder.make_rung(family, value, m, lad, mem)
                    config = rung.config()
                    tokens = budget / flops_per_token(config, m.seq_length)
                    ratio = tokens / num_parameters(config).total
                    run_id = f"iso-{_fmt(budget)}-{family}-{tag}{value}"
                    if not iso.min_tokens_per_parameter <= ratio <= iso.max_tokens_per_parameter:
                        dropped.append(Dropped(run_id, f"{ratio:.3g} tokens per parameter is outside "
                                               f"[{iso.min_tokens_per_parameter:g}, {iso.max_tokens_per_parameter:g}]"))
                        continue
                    add(rung, run_id, "isoflop", tokens, budget=budget)
    for sweep in spec.token_sweep:
        for family in sweep.families:
            rung = ladder.make_rung(family, sweep.rung, m, lad, mem)
            for tokens in sweep.tokens:
                add(rung, f"tok-{family}-{tag}{sweep.rung}-{_fmt(tokens)}", "tokens", tokens)
    for sweep in spec.memory_sweep:
        for value in sweep.values:
            memory = _memory_variant(mem, sweep.axis, value)
            rung = ladder.make_rung("lm2", sweep.rung, m, lad, memory)
            add(rung, f"mem-{sweep.axis}-{value.replace(':', '')}-{tag}{sweep.rung}-{_fmt(sweep.tokens)}",
                f"memory:{sweep.axis}", sweep.tokens, axis_value=value)
    ids = [r.id for r in runs]
    duplicate = next((i for i in ids if ids.count(i) > 1), None)
    if duplicate:
        from megatron_lm2.scaling.sweepfile import SweepFileError

        raise SweepFileError(f"{os.path.basename(spec.path)}: two runs are both {duplicate!r} (a value listed twice?)")
    return SweepPlan(name=spec.name, sweep_file=spec.path, out=spec.out, spec=spec.to_dict(), runs=runs,
                     dropped=dropped)


def _memory_variant(memory, axis: str, value: str):
    from megatron_lm2.scaling.sweepfile import SweepFileError

    if axis == "memory_layers":
        return dataclasses.replace(memory, layers=value)
    if not value.isdigit() or int(value) < 1:
        raise SweepFileError(f"[[memory_sweep]] values: {value!r} is not a positive integer (axis {axis})")
    if axis == "slots":
        if memory.write in ("token", "aligned"):
            raise SweepFileError(f"[[memory_sweep]] axis 'slots': the {memory.write} write has one slot per chunk "
                                 f"token (N = C); sweep axis = 'chunks_per_sequence', or set [memory] write = "
                                 f"'attention' to vary the slots on their own")
        return dataclasses.replace(memory, slots_rule="fixed", slots=int(value))
    return dataclasses.replace(memory, chunks_per_sequence=int(value))


# ------------------------------------------------------------------------------- plan.json
def write_plan(plan: SweepPlan) -> str:
    os.makedirs(plan.out, exist_ok=True)
    path = os.path.join(plan.out, PLAN_FILE)
    atomic_write_text(path, plan.to_json() + "\n")
    return path


def read_plan(path: str) -> SweepPlan:
    """plan.json (or the directory holding it)."""
    from megatron_lm2.scaling.util import SweepDataError

    if os.path.isdir(path):
        path = os.path.join(path, PLAN_FILE)
    with open(path) as handle:
        try:
            raw = json.load(handle)
        except json.JSONDecodeError as error:
            raise SweepDataError(f"{path}: not valid JSON ({error})") from None
    for key in ("version", "name", "runs", "dropped", "out"):
        if key not in raw:
            raise SweepDataError(f"{path}: key {key!r} is missing (not a plan.json from lm2-sweep plan?)")
    if raw["version"] != PLAN_VERSION:
        raise SweepDataError(f"{path}: version {raw['version']} (this lm2-sweep reads {PLAN_VERSION})")
    names = {f.name for f in dataclasses.fields(Run)}
    runs = []
    for i, item in enumerate(raw["runs"]):
        missing = sorted(names - set(item))
        if missing:
            raise SweepDataError(f"{path}: runs[{i}] has no key {missing[0]!r}")
        runs.append(Run(**{k: item[k] for k in names}))
    return SweepPlan(name=raw["name"], sweep_file=raw.get("sweep_file", ""), out=raw["out"], spec=raw.get("spec", {}),
                     runs=runs, dropped=[Dropped(**d) for d in raw["dropped"]])


def format_dry_run(plan: SweepPlan) -> str:
    """The sweep as a table: runs, sizes, tokens, compute, layout, GPU-hours; then the drops."""
    header = (f"{'run':<34}{'params':>9}{'mem':>8}{'GFLOP/tok':>10}{'tokens':>10}{'compute':>10}{'batch':>6}"
              f"{'lr':>9}{'steps':>7}  {'layout':<30}{'GiB':>6}{'GPU-h':>9}")
    lines = [f"sweep {plan.name}: {len(plan.runs)} runs, {len(plan.dropped)} dropped -> {plan.out}", header,
             "-" * len(header)]
    total_hours, unknown = 0.0, 0
    for run in plan.runs:
        lay = run.layout
        hours = run.gpu_hours
        if hours is None:
            unknown += 1
        else:
            total_hours += hours
        layout = f"{lay['nodes']}x{lay['gpus_per_node']} TP{lay['tp']} PP{lay['pp']} DP{lay['dp']} mb{lay['micro_batch_size']}"
        lines.append(
            f"{run.id:<34}{_si(run.parameters['total']):>9}{_si(run.parameters['memory']):>8}"
            f"{run.flops_per_token / 1e9:>10.4g}{_si(run.tokens):>10}{run.compute:>10.3g}{run.global_batch_size:>6}"
            f"{run.lr:>9.2e}{run.steps:>7}  {layout:<30}{lay['gib_per_gpu']:>6.1f}"
            f"{'n/a' if hours is None else f'{hours:,.0f}':>9}")
    lines.append(f"total GPU-hours ~{total_hours:,.0f}" + (f" (+{unknown} runs without a device peak)" if unknown else ""))
    by_nodes = {}
    for run in plan.runs:
        by_nodes[run.layout["nodes"]] = by_nodes.get(run.layout["nodes"], 0) + 1
    lines.append("slurm arrays: " + ", ".join(f"{n} node(s): {k} runs" for n, k in sorted(by_nodes.items())))
    for drop in plan.dropped:
        lines.append(f"dropped {drop.id}: {drop.reason}")
    return "\n".join(lines)


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def plan_sweep(sweep_file: str) -> SweepPlan:
    return build_plan(load_sweep(sweep_file))
