"""The sweep file (`sweep.toml`): one typed spec, validated key by key.

Every section is a dataclass; its fields are the keys the section accepts, with their types and
defaults. A wrong key, type or value raises SweepFileError naming the file, the section and the
key (`sweep.toml: [ladder] values: expected a non-empty list of positive integers, got 'x'`).
docs/scaling.md lists the keys; examples/sweeps/ holds complete files (the CPU demo's and a 1.7B-class
ladder for a 64-node cluster), each planned by a test.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_lm2.cli_errors import UserInputError
from megatron_lm2.config import MEMORY_INIT_MODES, MEMORY_QK_INIT_MODES, MEMORY_SCORE_MODES, MEMORY_WRITE_MODES
from megatron_lm2.flavors import RECIPE_CHUNK, recipe_memory

FAMILIES = ("lm2", "vanilla")
KNOBS = ("width", "depth")
SLOTS_RULES = ("proportional", "fixed", "chunk")  # chunk: N = C (the token write needs it)
MEMORY_HEADS_RULES = ("head_dim", "fixed")
BATCH_LR_RULES = ("deepseek", "fixed")
DECAY_STYLES = ("cosine", "linear", "WSD")
MEMORY_AXES = ("slots", "memory_layers", "chunks_per_sequence")


class SweepFileError(UserInputError):
    """A sweep file key that is missing, unknown or has a bad value; the message names it."""


def _choice(options):
    return dict(choices=tuple(options))


@dataclass(kw_only=True)
class ModelSection:
    """The base flavors the ladder's flags apply on top of (fields no flag sets, such as the
    RoPE base or the init std, come from them) and the sequence and vocabulary of every run."""
    lm2_flavor: str = "lm2-1.7b"
    vanilla_flavor: str = "llama-1.7b"
    vocab_size: int = 49152
    seq_length: int = 2048


@dataclass(kw_only=True)
class LadderSection:
    """One knob (width or depth) -> a whole decoder (megatron_lm2/scaling/ladder.py)."""
    values: List[int]
    knob: str = field(default="width", metadata=_choice(KNOBS))
    aspect_ratio: int = 128  # hidden_size / num_layers
    head_dim: int = 64
    ffn_ratio: float = 4.0  # ffn_hidden_size / hidden_size
    ffn_multiple: int = 64  # ffn_hidden_size rounded up to a multiple of this
    heads_per_group: int = 1  # attention heads per KV group (1 = MHA, as lm2-1.7b)


_RECIPE = recipe_memory()  # the lm2-* flavors' memory: the defaults below reproduce lm2-1.7b


@dataclass(kw_only=True)
class MemorySection:
    """How the memory scales with the ladder (ladder.py explains each rule). The defaults are the
    recipes' memory (flavors.recipe_memory: token write, N = C); the paper's attention write is
    write = "attention", scores = "dot", forget_bias = 0, write_shift = 0, qk_init = "independent"
    with a slots rule of its own."""
    slots_rule: str = field(default="chunk", metadata=_choice(SLOTS_RULES))
    slots_per_width: float = 1.0  # proportional: memory_slots = slots_per_width * hidden_size
    slots: int = 2048  # fixed: memory_slots
    heads_rule: str = field(default="head_dim", metadata=_choice(MEMORY_HEADS_RULES))
    head_dim: int = 256  # head_dim rule: memory_heads = hidden_size / head_dim (at least 1)
    heads: int = 8  # fixed rule
    chunks_per_sequence: int = 2048 // RECIPE_CHUNK  # memory_chunk_size = seq_length / this
    layers: str = "all"  # "all" | "every:K" | "first:K" | "last:K"
    write: str = field(default=_RECIPE["memory_write"], metadata=_choice(MEMORY_WRITE_MODES))
    init: str = field(default="identity", metadata=_choice(MEMORY_INIT_MODES))
    scores: str = field(default=_RECIPE["memory_scores"], metadata=_choice(MEMORY_SCORE_MODES))
    forget_bias: float = _RECIPE["memory_forget_bias"]  # memory_forget_bias: the forget gate's logit offset
    write_shift: int = field(default=_RECIPE["memory_write_shift"], metadata=dict(nonneg=True))  # memory_write_shift: each written token plus the k before it (0: none)
    qk_init: str = field(default=_RECIPE["memory_qk_init"], metadata=_choice(MEMORY_QK_INIT_MODES))  # memory_qk_init


@dataclass(kw_only=True)
class IsoflopSection:
    """isoFLOP grids: at each compute budget, every ladder rung (both families) trained for
    budget / (executed FLOPs per token) tokens, kept if its tokens per parameter is in range."""
    budgets: List[float]
    min_tokens_per_parameter: float = 1.0
    max_tokens_per_parameter: float = 1000.0
    families: List[str] = field(default_factory=lambda: list(FAMILIES), metadata=_choice(FAMILIES))


@dataclass(kw_only=True)
class TokenSweepSection:
    """A fixed-size model trained for several token counts."""
    rung: int
    tokens: List[float]
    families: List[str] = field(default_factory=lambda: list(FAMILIES), metadata=_choice(FAMILIES))


@dataclass(kw_only=True)
class MemorySweepSection:
    """One memory axis swept at a fixed base size and token count (LM2 only)."""
    rung: int
    tokens: float
    axis: str = field(metadata=_choice(MEMORY_AXES))
    values: List[str]  # integers for slots / chunks_per_sequence, layer rules for memory_layers


@dataclass(kw_only=True)
class ScheduleSection:
    """Batch size and LR per run (rules.py) and the schedule shape."""
    rule: str = field(default="deepseek", metadata=_choice(BATCH_LR_RULES))
    batch_sequences: int = 256  # fixed rule
    lr: float = 2e-4  # fixed rule
    lr_scale: float = 1.0  # multiplies the rule's LR
    lr_max: float = 1.0  # clamp on the rule's LR
    batch_min_sequences: int = 1
    batch_max_sequences: int = 1 << 20
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.01
    min_warmup_iters: int = 1
    decay_style: str = field(default="cosine", metadata=_choice(DECAY_STYLES))
    wsd_decay_fraction: float = 0.2  # WSD: the last fraction of steps decays
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    min_steps: int = 20  # runs with fewer optimizer steps are dropped
    evals_per_run: int = 10  # validation points along each run (for the curves collect reads)
    eval_iters: int = 10
    log_interval: int = 10
    seed: int = 1234


@dataclass(kw_only=True)
class ClusterSection:
    """The cluster the layouts are searched for (layout.py)."""
    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "H100"
    bf16: bool = True
    mfu: float = 0.4  # assumed for GPU-hours and the per-run time limit
    max_hours: float = 24.0  # a run's estimated wall time must fit in this
    peak_tflops: Optional[float] = None  # override the device table (e.g. a CPU's measured rate)
    micro_batch_sizes: List[int] = field(default_factory=lambda: [8, 4, 2, 1])
    max_tensor_parallel: int = 8
    max_pipeline_parallel: int = 8


@dataclass(kw_only=True)
class DataSection:
    data_path: List[str] = field(default_factory=list)
    mock_data: bool = False
    tokenizer: Optional[str] = None
    split: str = "98,2,0"


@dataclass(kw_only=True)
class SweepSpec:
    name: str
    out: str  # run directories, plan.json, slurm scripts (relative paths: to the sweep file)
    model: ModelSection
    ladder: LadderSection
    memory: MemorySection
    schedule: ScheduleSection
    cluster: ClusterSection
    data: DataSection
    isoflop: Optional[IsoflopSection] = None
    token_sweep: List[TokenSweepSection] = field(default_factory=list)
    memory_sweep: List[MemorySweepSection] = field(default_factory=list)
    path: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = dict(model=ModelSection, ladder=LadderSection, memory=MemorySection, schedule=ScheduleSection,
                 cluster=ClusterSection, data=DataSection, isoflop=IsoflopSection)
_LISTS = dict(token_sweep=TokenSweepSection, memory_sweep=MemorySweepSection)
_REQUIRED_SECTIONS = ("ladder",)


def load_sweep(path: str) -> SweepSpec:
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise SweepFileError(f"{path}: not valid TOML: {error}") from None
    return parse_sweep(raw, path)


def parse_sweep(raw: dict, path: str = "sweep.toml") -> SweepSpec:
    name = os.path.basename(path)
    known = {"name", "out", *_SECTIONS, *_LISTS}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SweepFileError(f"{name}: unknown top-level key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    for key in _REQUIRED_SECTIONS:
        if key not in raw:
            raise SweepFileError(f"{name}: [{key}] section is missing")
    values = {}
    for key in ("name", "out"):
        if key not in raw:
            raise SweepFileError(f"{name}: top-level key {key!r} is missing")
        if not isinstance(raw[key], str) or not raw[key]:
            raise SweepFileError(f"{name}: {key}: expected a non-empty string, got {raw[key]!r}")
        values[key] = raw[key]
    out = values["out"]
    if not os.path.isabs(out):
        values["out"] = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), out))
    for key, cls in _SECTIONS.items():
        if key in raw:
            values[key] = _section(cls, raw[key], f"{name}: [{key}]")
        elif key != "isoflop":
            values[key] = _section(cls, {}, f"{name}: [{key}]")
    for key, cls in _LISTS.items():
        items = raw.get(key, [])
        if not isinstance(items, list):
            raise SweepFileError(f"{name}: {key}: expected [[{key}]] tables")
        values[key] = [_section(cls, item, f"{name}: [[{key}]] #{i + 1}") for i, item in enumerate(items)]
    spec = SweepSpec(**values, path=os.path.abspath(path))
    _cross_check(spec, name)
    return spec


def _section(cls, table, where: str):
    if not isinstance(table, dict):
        raise SweepFileError(f"{where}: expected a table, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise SweepFileError(f"{where} unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, f in fields.items():
        if key not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SweepFileError(f"{where} {key}: required key is missing")
            continue
        values[key] = _convert(table[key], hints[key], f"{where} {key}", nonneg=f.metadata.get("nonneg", False))
        choices = f.metadata.get("choices")
        if choices:
            for item in (values[key] if isinstance(values[key], list) else [values[key]]):
                if item not in choices:
                    raise SweepFileError(f"{where} {key}: {item!r} is not one of {', '.join(choices)}")
    return cls(**values)


def _convert(value, hint, where: str, nonneg: bool = False):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        return None if value is None else _convert(value, inner, where, nonneg)
    if origin in (list, List):
        if not isinstance(value, list) or not value:
            raise SweepFileError(f"{where}: expected a non-empty list of {_name(args[0])}, got {value!r}")
        return [_convert(item, args[0], where, nonneg) for item in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise SweepFileError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if nonneg else 1):
            raise SweepFileError(f"{where}: expected a {'non-negative' if nonneg else 'positive'} integer, "
                                 f"got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise SweepFileError(f"{where}: expected a finite non-negative number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # memory_sweep values may be numbers
        if not isinstance(value, str):
            raise SweepFileError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported sweep field type {hint}")


def _name(hint) -> str:
    return {int: "positive integers", float: "numbers", str: "strings"}.get(hint, str(hint))


def _cross_check(spec: SweepSpec, name: str) -> None:
    from megatron_lm2.flavors import list_flavors

    for key in ("lm2_flavor", "vanilla_flavor"):
        flavor = getattr(spec.model, key)
        if flavor not in list_flavors():
            raise SweepFileError(f"{name}: [model] {key}: unknown flavor {flavor!r} "
                                 f"(known: {', '.join(list_flavors())})")
    multiple = 128 * spec.cluster.max_tensor_parallel
    if spec.model.vocab_size % multiple:
        padded = -(-spec.model.vocab_size // multiple) * multiple
        raise SweepFileError(f"{name}: [model] vocab_size: {spec.model.vocab_size} is not a multiple of 128 x "
                             f"max_tensor_parallel = {multiple} (lm2-train would pad it and the FLOPs would "
                             f"differ by layout); use {padded}")
    if spec.isoflop is None and not spec.token_sweep and not spec.memory_sweep:
        raise SweepFileError(f"{name}: no runs: give an [isoflop] section, [[token_sweep]] or [[memory_sweep]] tables")
    for i, sweep in enumerate(spec.token_sweep + spec.memory_sweep):
        if sweep.rung not in spec.ladder.values:
            kind = "token_sweep" if i < len(spec.token_sweep) else "memory_sweep"
            raise SweepFileError(f"{name}: [[{kind}]] rung: {sweep.rung} is not one of [ladder] values "
                                 f"{spec.ladder.values}")
    _check_ranges(spec, name)
    if spec.cluster.mfu <= 0 or spec.cluster.mfu > 1:
        raise SweepFileError(f"{name}: [cluster] mfu: expected a fraction in (0, 1], got {spec.cluster.mfu}")
    if spec.schedule.decay_style == "WSD" and not 0 < spec.schedule.wsd_decay_fraction <= 1:
        raise SweepFileError(f"{name}: [schedule] wsd_decay_fraction: expected a fraction in (0, 1], "
                             f"got {spec.schedule.wsd_decay_fraction}")
    if not spec.data.mock_data and not spec.data.data_path:
        raise SweepFileError(f"{name}: [data] data_path: required unless mock_data = true")


def _check_ranges(spec: SweepSpec, name: str) -> None:
    """Values each of the right type but meaningless together or out of range: each would plan
    with exit 0 and a ladder that is not what the file seems to ask for."""
    schedule = spec.schedule
    checks = []
    if spec.isoflop is not None:
        iso = spec.isoflop
        checks += [
            ("[isoflop] budgets", all(b > 0 for b in iso.budgets), f"every budget must be > 0 FLOPs, got {iso.budgets}"),
            ("[isoflop] min_tokens_per_parameter", iso.min_tokens_per_parameter <= iso.max_tokens_per_parameter,
             f"{iso.min_tokens_per_parameter:g} is above max_tokens_per_parameter {iso.max_tokens_per_parameter:g}"),
            ("[isoflop] max_tokens_per_parameter", iso.max_tokens_per_parameter > 0, "must be > 0"),
        ]
    for i, sweep in enumerate(spec.token_sweep):
        checks.append((f"[[token_sweep]] #{i + 1} tokens", all(t > 0 for t in sweep.tokens),
                       f"every token count must be > 0, got {sweep.tokens}"))
    for i, sweep in enumerate(spec.memory_sweep):
        checks.append((f"[[memory_sweep]] #{i + 1} tokens", sweep.tokens > 0, f"must be > 0, got {sweep.tokens:g}"))
    checks += [
        ("[schedule] warmup_fraction", 0 <= schedule.warmup_fraction < 1,
         f"expected a fraction in [0, 1), got {schedule.warmup_fraction:g}"),
        ("[schedule] min_lr_ratio", 0 <= schedule.min_lr_ratio <= 1,
         f"expected a fraction in [0, 1] of the peak LR, got {schedule.min_lr_ratio:g}"),
        ("[schedule] batch_min_sequences", schedule.batch_min_sequences <= schedule.batch_max_sequences,
         f"{schedule.batch_min_sequences} is above batch_max_sequences {schedule.batch_max_sequences}"),
        ("[schedule] lr_scale", schedule.lr_scale > 0, f"must be > 0, got {schedule.lr_scale:g}"),
        ("[schedule] lr_max", schedule.lr_max > 0, f"must be > 0, got {schedule.lr_max:g}"),
        ("[schedule] lr", schedule.rule != "fixed" or schedule.lr > 0, f"must be > 0, got {schedule.lr:g}"),
    ]
    for where, ok, what in checks:
        if not ok:
            raise SweepFileError(f"{name}: {where}: {what}")
