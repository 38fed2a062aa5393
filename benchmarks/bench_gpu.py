"""One-GPU benchmark of LM2 against its vanilla twin, most important numbers first.

    python benchmarks/bench_gpu.py --out benchmarks/gpu_run.json   # one H100/H200, <= 8 minutes
    python benchmarks/bench_gpu.py --plan                          # what each section runs; runs nothing
    python benchmarks/bench_gpu.py --smoke                         # CPU, tiny shapes: checks the script

Each record is printed as a JSON line as soon as it is measured; --out also rewrites PATH (one
JSON document: device, date, git commit, every record) and PATH with .md (a markdown table)
after each. A section that would not fit in --budget-s is skipped with a line saying so; after
every section its models are released (references dropped, collected, CUDA cache emptied,
peak statistics reset), so each peak is the section's own.

Timings: warm-up steps, then >= 5 timed steps per model; the median and the spread
((max - min) / median) are reported, and every target is checked on medians.
MFU: TFLOP/s over the dense BF16 peak of the device named at run time
(megatron_lm2.training.metrics.peak_tflops: H100 SXM / NVL / PCIe, H200), for every model; an
FP8 step is reported as a speed-up over BF16, not as MFU.

Sections:
  a  llama-1.7b vs lm2-1.7b, 16 layers, bf16, micro-batch 4 x 2048 tokens, the trainer's own
     step (DDP + distributed optimizer, runtime settings of training/build.py; TE spec if
     Transformer Engine imports, else local), the two models' steps interleaved (both resident
     where the plan says they fit, else alternating blocks): tokens/s, TFLOP/s, MFU, memory;
     then the LM2/vanilla ratio of median step times against 1.10 x the executed-FLOP ratio.
  b  one memory module at the 1.7B shape, the old explicit-score path
     (benchmarks/memory_baseline.py) vs the SDPA path, the SDPA path forced onto flash
     attention on CUDA after a flash-vs-math parity check (bf16 tolerance; skipped on a CPU,
     saying why): time, peak memory, max differences, top CUDA kernels (torch.profiler).
  c  lm2-1.7b at micro-batch 8, if it fits.
  d  lm2-1.7b in FP8, each recipe (delayed, tensorwise, blockwise), when TE is present:
     tokens/s against bf16 (target >= 1.35x).
benchmarks/README.md says how to run it where megatron-core is not installed
(tools/fetch_device_wheels.sh); results go to benchmarks/gpu.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # memory_baseline
sys.path.insert(0, os.path.dirname(HERE))  # megatron_lm2 from a plain checkout

FULL = dict(seq_length=2048, micro_batch_size=4, steps=10, warmup=3,
            module=dict(hidden_size=2048, num_attention_heads=32, memory_slots=2048, memory_heads=8,
                        memory_chunk_size=1024, seq_length=2048), module_batch=4)
SMOKE = dict(seq_length=128, micro_batch_size=2, steps=5, warmup=1,
             model_overrides=dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                  num_query_groups=4, vocab_size=512, memory_slots=64, memory_heads=4,
                                  memory_chunk_size=64),
             module=dict(hidden_size=64, num_attention_heads=4, memory_slots=64, memory_heads=4,
                         memory_chunk_size=64, seq_length=128), module_batch=2)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _machine() -> dict:
    info = dict(torch=torch.__version__, python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        import megatron.core

        info["megatron_core"] = getattr(megatron.core, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        info["megatron_core"] = f"missing: {exc!r}"
    try:
        import transformer_engine

        info["transformer_engine"] = transformer_engine.__version__
    except Exception as exc:  # noqa: BLE001
        info["transformer_engine"] = f"not importable: {type(exc).__name__}"
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    from megatron_lm2.provenance import git_commit

    info["commit"] = git_commit(cwd=HERE)
    return info


# ------------------------------------------------------------------------ memory between sections
def free_memory() -> None:
    """Between sections: collect what the last one left (a model's config holds its DDP
    wrapper's bound methods, a reference cycle only the collector frees), hand the cached
    blocks back and restart the peak, so the next section's peak is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


# -------------------------------------------------------------------------------------- timings
def summarize(times: list) -> dict:
    """Median and spread of per-step seconds (the spread: (max - min) / median)."""
    ordered = sorted(times)
    median = statistics.median(ordered)
    return dict(median_s=median, min_s=ordered[0], max_s=ordered[-1], steps=len(ordered),
                spread=(ordered[-1] - ordered[0]) / median if median else None)


def interleaved_timing(steps: dict, warmup: int, repeats: int, clock=time.perf_counter, sync=None) -> dict:
    """Warm every step function up, then `repeats` rounds of one timed step of each, the
    order reversed every other round (A B B A A B ...), so drift, caches and the allocator's
    growth fall on every model alike. Returns {name: summarize(its step times)}."""
    sync = sync or _sync
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    sync()
    times = {name: [] for name in names}
    for round_index in range(repeats):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            start = clock()
            steps[name]()
            sync()
            times[name].append(clock() - start)
    return {name: summarize(values) for name, values in times.items()}


# ----------------------------------------------------------------------- a, c, d: the training step
def _train_argv(flavor: str, shape: dict, micro_batch: int, fp8_recipe, smoke: bool) -> list:
    argv = ["--flavor", flavor, "--mock-data", "--micro-batch-size", str(micro_batch),
            "--global-batch-size", str(micro_batch), "--train-iters", "1000", "--lr-warmup-iters", "10",
            "--seq-length", str(shape["seq_length"]), "--nodes", "1", "--gpus-per-node", "1",
            "--gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "H100"]
    if not smoke or fp8_recipe:  # FP8 GEMMs run with bf16 elsewhere
        argv.append("--bf16")
    for key, value in shape.get("model_overrides", {}).items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    if fp8_recipe:
        argv += ["--fp8-format", "hybrid", "--fp8-recipe", fp8_recipe]
    return argv


def _train_config(flavor: str, shape: dict, micro_batch: int, fp8_recipe, smoke: bool):
    from megatron_lm2.training.config import parse_args

    return parse_args(_train_argv(flavor, shape, micro_batch, fp8_recipe, smoke), world_size=1)


class TrainStep:
    """One model's training step (the trainer's model chunks, distributed optimizer and
    forward_backward_func) on random tokens. close() drops the model and breaks the config's
    cycle through the DDP wrapper; free_memory() then returns its memory."""

    def __init__(self, flavor: str, shape: dict, micro_batch: int, smoke: bool, fp8_recipe=None):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_lm2.accounting import executed_attention_kernel, flops_per_token
        from megatron_lm2.training.build import (
            build_model_chunks,
            build_optimizer,
            set_schedule_hooks,
            transformer_backend,
        )

        before = _allocated()
        train = _train_config(flavor, shape, micro_batch, fp8_recipe, smoke)
        self.config = config = train.model_config()
        self.backend = transformer_backend(train)
        torch.manual_seed(0)
        self.model_chunks = build_model_chunks(train, config)
        set_schedule_hooks(config, self.model_chunks)
        self.optimizer, _ = build_optimizer(train, config, self.model_chunks)
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.seq = seq = config.seq_length
        self.micro_batch = micro_batch
        self.tokens = torch.randint(0, config.vocab_size, (micro_batch, seq), device=device)
        self.positions = torch.arange(seq, device=device).expand(micro_batch, -1)
        self.forward_backward = get_forward_backward_func()
        self.info = dict(flavor=flavor, backend=self.backend, micro_batch=micro_batch, seq=seq,
                         dtype="fp8" if fp8_recipe else ("bf16" if config.bf16 else "fp32"), fp8_recipe=fp8_recipe,
                         gflop_per_token=flops_per_token(
                             config, micro_batch_size=micro_batch,
                             kernel=executed_attention_kernel(self.backend, torch.cuda.is_available(), config)) / 1e9)
        self.step_extra = 0
        self.built_bytes = _allocated() - before

    @staticmethod
    def _loss(per_token_loss):
        loss = per_token_loss.float().sum()
        count = torch.tensor(per_token_loss.numel(), device=loss.device, dtype=torch.int)
        return loss, count, {"lm loss": torch.stack([loss.detach(), count.float()])}

    def _forward_step(self, _iterator, model):
        return model(self.tokens, self.positions, None, labels=self.tokens), self._loss  # the model's own mask

    def __call__(self) -> None:
        base = _allocated()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.forward_backward(forward_step_func=self._forward_step, data_iterator=iter([None]),
                              model=self.model_chunks, num_microbatches=1, seq_length=self.seq,
                              micro_batch_size=self.micro_batch, decoder_seq_length=self.seq, forward_only=False)
        self.optimizer.step()
        if torch.cuda.is_available():
            self.step_extra = max(self.step_extra, torch.cuda.max_memory_allocated() - base)

    def result(self, timing: dict, resident_bytes: int) -> dict:
        """tokens/s, TFLOP/s and MFU at the median step (MFU: against the device's dense BF16
        peak whatever the dtype; an FP8 step is reported as a speed-up over BF16, not as MFU)."""
        peak, _ = bf16_peak()
        tokens_per_s = self.micro_batch * self.seq / timing["median_s"]
        tflops = tokens_per_s * self.info["gflop_per_token"] / 1e3
        mfu = tflops / peak if peak and not self.info["fp8_recipe"] else None
        memory = None
        if torch.cuda.is_available():
            memory = dict(model_resident_gib=resident_bytes / 2**30, step_extra_gib=self.step_extra / 2**30,
                          peak_gib=(resident_bytes + self.step_extra) / 2**30)
        return dict(**self.info, **timing, step_s=timing["median_s"], tokens_per_s=tokens_per_s,
                    tflops=tflops, mfu=mfu, memory=memory)

    def close(self) -> None:
        for field in ("no_sync_func", "grad_sync_func", "finalize_model_grads_func", "param_sync_func"):
            if hasattr(self.config, field):
                setattr(self.config, field, None)
        self.model_chunks = self.optimizer = self.forward_backward = self.tokens = self.positions = None


def bf16_peak() -> tuple:
    """The MFU convention of this benchmark: the device's dense BF16 peak (TFLOP/s) for every
    model, from the device name read now (megatron_lm2.training.metrics.peak_tflops). None on
    a CPU or an unknown card."""
    from megatron_lm2.training.metrics import peak_tflops

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return peak_tflops(name, "bf16"), name


def compare_benchmark(flavors: tuple, shape: dict, micro_batch: int, smoke: bool, clock=time.perf_counter,
                      resident: bool = True) -> dict:
    """LM2 against vanilla, interleaved. resident: both models built side by side, warmed up,
    then timed step by step in alternation (interleaved_timing). Otherwise (both do not fit)
    alternating blocks: each model built, warmed up, timed for half the steps and released,
    twice, in the order A B B A. Returns {flavor: result}; compare the medians."""
    steps, built = {}, {}
    try:
        if resident:
            for flavor in flavors:
                before = _allocated()
                steps[flavor] = TrainStep(flavor, shape, micro_batch, smoke)
                steps[flavor]()  # the optimizer's states exist after the first step
                built[flavor] = _allocated() - before
            timing = interleaved_timing(steps, shape["warmup"], shape["steps"], clock=clock)
            return {flavor: steps[flavor].result(timing[flavor], built[flavor]) for flavor in flavors}
        times, last = {flavor: [] for flavor in flavors}, {}
        per_block = max(3, -(-shape["steps"] // 2))
        for flavor in (*flavors, *flavors[::-1]):
            before = _allocated()
            step = steps[flavor] = TrainStep(flavor, shape, micro_batch, smoke)
            step()
            built[flavor] = _allocated() - before
            for _ in range(shape["warmup"]):
                step()
            _sync()
            for _ in range(per_block):
                start = clock()
                step()
                _sync()
                times[flavor].append(clock() - start)
            last[flavor] = step.result(summarize(times[flavor]), built[flavor])
            step.close()
            steps.pop(flavor)
            step = None
            free_memory()
        return last
    finally:
        for step in steps.values():
            step.close()
        steps.clear()
        free_memory()


def train_step_benchmark(flavor: str, shape: dict, micro_batch: int, smoke: bool, fp8_recipe=None) -> dict:
    """One model's step, warmed up, >= steps timed: median, spread, tokens/s, TFLOP/s, MFU."""
    step = None
    try:
        before = _allocated()
        step = TrainStep(flavor, shape, micro_batch, smoke, fp8_recipe)
        step()
        resident = _allocated() - before
        timing = interleaved_timing({flavor: step}, shape["warmup"], shape["steps"])[flavor]
        return step.result(timing, resident)
    finally:
        if step is not None:
            step.close()
        step = None
        free_memory()


# ------------------------------------------------------------------- b: the memory module alone
def memory_module_benchmark(shape: dict, batch: int, repeats: int, dtype) -> dict:
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.specs import get_memory_local_spec
    from memory_baseline import explicit_forward

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    cfg = get_flavor("debug", params_dtype=dtype, **shape)
    torch.manual_seed(0)
    module = build_module(get_memory_local_spec(), config=cfg, layer_number=1).to(device)
    tokens = torch.randn(cfg.seq_length, batch, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
    params = [tokens] + list(module.parameters())
    parity = flash_parity(module, tokens)  # before any timing: the forced kernel must agree
    new_forward = (lambda: _with_flash(lambda: module(tokens)[0])) if parity.get("flash") else (lambda: module(tokens)[0])
    paths = {"old": lambda: explicit_forward(module, tokens)[0], "new": new_forward}
    result, outputs = {}, {}
    for name, forward in paths.items():
        def step():
            out = forward()
            grads = torch.autograd.grad(out.float().square().mean(), params)
            return out, grads

        for _ in range(2):
            outputs[name] = step()
        _sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        _sync()
        row = dict(ms=(time.perf_counter() - start) / repeats * 1e3)
        if torch.cuda.is_available():
            row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            _sync()
        row["top_kernels"] = _top_kernels(prof, 8)
        result[name] = row
    (out_old, g_old), (out_new, g_new) = outputs["old"], outputs["new"]
    result["max_abs_diff_out"] = (out_old.float() - out_new.float()).abs().max().item()
    result["max_rel_diff_grad"] = max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item() for a, b in zip(g_old, g_new))
    result["speedup"] = result["old"]["ms"] / result["new"]["ms"]
    result["new_path_sdpa"] = "flash (forced)" if parity.get("flash") else "default backend"
    result["flash_parity"] = parity
    return result


def _with_flash(fn):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return fn()


BF16_TOLERANCE = 2e-2  # max |flash - math| / max |math| of the module's output


def flash_parity(module, tokens) -> dict:
    """The memory read (and attention write) run torch SDPA: on CUDA, its output with the
    flash kernel forced against the math kernel, within bf16 tolerance (raises if not, so no
    timing of a wrong kernel). On a CPU there is no flash kernel to force: says so."""
    if not torch.cuda.is_available():
        return dict(flash=False, skipped="CPU: torch's flash-attention SDPA kernel is CUDA-only; "
                                         "the new path runs the default CPU backend")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad():
        try:
            flash = _with_flash(lambda: module(tokens)[0]).float()
        except RuntimeError as exc:  # no flash kernel for these inputs: a finding, not a lost section
            return dict(flash=False, skipped=f"flash attention refused the memory's SDPA calls: {str(exc)[:300]}")
        with sdpa_kernel([SDPBackend.MATH]):
            math = module(tokens)[0].float()
    rel = ((flash - math).abs().max() / math.abs().max().clamp_min(1e-30)).item()
    if not rel <= BF16_TOLERANCE:
        raise AssertionError(f"memory read: flash vs math max relative difference {rel:.3g} > {BF16_TOLERANCE}")
    return dict(flash=True, max_rel_diff_flash_vs_math=rel, tolerance=BF16_TOLERANCE)


def _top_kernels(prof, count: int) -> list:
    """The profile's most expensive CUDA kernels by their own time (CPU ops on a CPU)."""
    events = list(prof.key_averages())
    if torch.cuda.is_available():
        kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
        events = kernels or events

        def own(e):
            return getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
    else:
        def own(e):
            return e.self_cpu_time_total
    events.sort(key=own, reverse=True)
    return [dict(name=e.key[:90], ms=round(own(e) / 1e3, 3), calls=e.count) for e in events[:count]]


# ------------------------------------------------------------------------------------- the plan
def section_specs(smoke: bool) -> list:
    """What each section runs: the one list --plan prints and main() runs."""
    shape = SMOKE if smoke else FULL
    vanilla, lm2 = ("debug-vanilla", "debug") if smoke else ("llama-1.7b", "lm2-1.7b")
    mb = shape["micro_batch_size"]
    common = dict(seq_length=shape["seq_length"], steps=shape["steps"], warmup=shape["warmup"],
                  dtype="fp32" if smoke else "bf16")
    specs = [dict(section="a", what=f"{vanilla} vs {lm2} train step, interleaved", flavors=[vanilla, lm2],
                  micro_batch=mb, **common),
             dict(section="b", what="memory module, old path vs SDPA path (flash forced on CUDA), fwd+bwd",
                  module=shape["module"], micro_batch=shape["module_batch"], steps=2 if smoke else 5, warmup=2,
                  dtype=common["dtype"]),
             dict(section="c", what=f"{lm2} train step, micro-batch {2 * mb}", flavors=[lm2], micro_batch=2 * mb,
                  **common)]
    for recipe in ("delayed", "tensorwise", "blockwise"):
        specs.append(dict(section="d", what=f"{lm2} train step, FP8 {recipe}", flavors=[lm2], micro_batch=mb,
                          fp8_recipe=recipe, **{**common, "dtype": "fp8"}))
    return specs


def plan_sections(smoke: bool, sections: str = "abcd") -> list:
    """Each section's shape and its expected memory from megatron_lm2.training.plan.make_plan
    (one GPU, no parallelism). Builds nothing."""
    from megatron_lm2.training.plan import make_plan

    shape = SMOKE if smoke else FULL
    rows = []
    for spec in section_specs(smoke):
        if spec["section"] not in sections:
            continue
        row = dict(spec)
        models = []
        for flavor in spec.get("flavors", []):
            train = _train_config(flavor, shape, spec["micro_batch"], spec.get("fp8_recipe"), smoke)
            config, plan = train.model_config(), make_plan(train)
            bytes_per_parameter = 2 if (train.bf16 or train.fp8_format) else 4
            models.append(dict(flavor=flavor, layers=config.num_layers, hidden=config.hidden_size,
                               heads=config.num_attention_heads, ffn=config.ffn_hidden_size, vocab=config.vocab_size,
                               parameters=plan.parameters_per_gpu, bytes_per_parameter=bytes_per_parameter,
                               parameter_bytes=plan.parameters_per_gpu * bytes_per_parameter,
                               expected_gib=dict(weights=plan.weights_gib, grads=plan.grads_gib,
                                                 optimizer=plan.optimizer_gib, activations=plan.activations_gib,
                                                 total=plan.total_gib)))
        if models:
            row["models"] = models
            # Section a keeps both models resident: their states add up, one step's activations at a time.
            row["expected_total_gib"] = (sum(m["expected_gib"]["total"] - m["expected_gib"]["activations"]
                                             for m in models) + max(m["expected_gib"]["activations"] for m in models))
        rows.append(row)
    return rows


def format_plan(rows: list) -> str:
    lines = []
    for row in rows:
        lines.append(f"[{row['section']}] {row['what']}: micro-batch {row['micro_batch']}, "
                     f"{row['warmup']} warm-up + {row['steps']} timed steps, {row['dtype']}")
        for m in row.get("models", []):
            e = m["expected_gib"]
            lines.append(f"    {m['flavor']}: {m['layers']} layers x {m['hidden']} hidden, {m['heads']} heads, "
                         f"ffn {m['ffn']}, vocab {m['vocab']}, seq {row['seq_length']}: {m['parameters'] / 1e6:.1f}M "
                         f"parameters ({m['parameter_bytes'] / 2**30:.2f} GiB); expected weights {e['weights']:.2f} + "
                         f"grads {e['grads']:.2f} + optimizer {e['optimizer']:.2f} + activations {e['activations']:.2f} "
                         f"= {e['total']:.1f} GiB")
        if "expected_total_gib" in row:
            lines.append(f"    expected in memory at once: {row['expected_total_gib']:.1f} GiB")
        if "module" in row:
            lines.append(f"    module {row['module']}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- output
def markdown(records: list) -> str:
    """The run as a table: one row per measured model (section a, c, d) plus the ratios."""
    machine = next((r for r in records if r.get("section") == "machine"), {})
    lines = [f"# bench_gpu.py: {machine.get('device', '?')}, {machine.get('date', '?')}, commit {machine.get('commit', '?')}",
             "", f"MFU convention: {machine.get('mfu_convention', '?')}", "",
             "| section | what | median step ms | spread | steps | tokens/s | TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    for r in records:
        if "median_s" in r:
            peak = (r.get("memory") or {}).get("peak_gib")
            lines.append(f"| {r['section']} | {r['what']} | {f(r['median_s'] * 1e3, '.1f')} | {f(r.get('spread'), '.1%')} "
                         f"| {r.get('steps', '-')} | {f(r.get('tokens_per_s'), ',.0f')} | {f(r.get('tflops'), '.4g')} "
                         f"| {f(r.get('mfu'), '.1%')} | {f(peak, '.1f')} |")
    lines.append("")
    for r in records:
        if "median_s" in r or r.get("section") in ("machine", "done"):
            continue
        keys = {k: v for k, v in r.items() if k not in ("t_s", "section", "what", "traceback", "top_kernels")}
        lines.append(f"- {r.get('section')} {r.get('what', '')}: " + json.dumps(keys, default=str)[:600])
    return "\n".join(lines) + "\n"


class Report:
    """Prints each record as a JSON line as it comes and, with --out, rewrites PATH (one JSON
    document: the machine and every record) and PATH with .md (the table) after each, so a
    run cut short still leaves what it measured."""

    def __init__(self, path, budget_s: float):
        self.path = path
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.records = []
        self.start = time.perf_counter()
        self.budget = budget_s

    def emit(self, record: dict) -> None:
        record = {"t_s": round(time.perf_counter() - self.start, 1), **record}
        self.records.append(record)
        print(json.dumps(record, default=str), flush=True)
        if self.path:
            with open(self.path, "w") as out:
                json.dump(dict(records=self.records), out, indent=1, default=str)
                out.write("\n")
            with open(os.path.splitext(self.path)[0] + ".md", "w") as out:
                out.write(markdown(self.records))

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the run here as JSON (and a markdown table next to it, .md)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks that the script runs")
    parser.add_argument("--plan", action="store_true",
                        help="print what each section will run and its expected memory; run nothing")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip sections that would start after this")
    parser.add_argument("--sections", default="abcd", help="which sections to run (default: abcd)")
    args = parser.parse_args(argv)
    if args.plan:
        from megatron_lm2.train import quiet_library_warnings

        quiet_library_warnings()
        print(format_plan(plan_sections(args.smoke, args.sections)), flush=True)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here; use --smoke to check the script on a CPU", file=sys.stderr)
        return 2
    shape = SMOKE if args.smoke else FULL
    report = Report(args.out, args.budget_s)
    from megatron_lm2 import distributed
    from megatron_lm2.specs import te_available
    from megatron_lm2.train import quiet_library_warnings

    quiet_library_warnings()
    distributed.initialize()
    peak, device = bf16_peak()
    report.emit(dict(section="machine", smoke=args.smoke, **_machine(), peak_bf16_tflops=peak,
                     mfu_convention=f"MFU = TFLOP/s / dense BF16 peak of {device} "
                                    f"({peak if peak else 'unknown'} TFLOP/s), for every model; "
                                    "FP8 as a speed-up over BF16, not as MFU"))
    te = te_available() and torch.cuda.is_available()
    # Rough section costs (s) on an H100, to stay inside the budget.
    costs = {"a": 150, "b": 60, "c": 60, "d": 150}
    specs = {(s["section"], s.get("fp8_recipe")): s for s in section_specs(args.smoke)}

    def run(section, label, fn):
        if section not in args.sections:
            return None
        if report.left() < (5 if args.smoke else costs[section] / 2):
            report.emit(dict(section=section, what=label, skipped=f"budget: {report.left():.0f} s left"))
            return None
        try:
            result = fn()
        except torch.cuda.OutOfMemoryError as exc:
            result = dict(oom=str(exc).splitlines()[0])
        except Exception as exc:  # noqa: BLE001  (one failing section must not lose the others)
            result = dict(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=3))
        free_memory()  # the next section starts with none of this one's memory
        return result

    spec = specs[("a", None)]
    vanilla_name, lm2_name = spec["flavors"]
    mb = spec["micro_batch"]
    resident = True
    if torch.cuda.is_available():  # both models at once only where the plan says they fit
        expected = plan_sections(args.smoke, "a")[0]["expected_total_gib"]
        resident = expected < 0.85 * torch.cuda.get_device_properties(0).total_memory / 2**30
    pair = run("a", spec["what"] + ("" if resident else " (alternating blocks: both do not fit at once)"),
               lambda: compare_benchmark((vanilla_name, lm2_name), shape, mb, args.smoke, resident=resident))
    if pair and "oom" in pair and resident:  # the estimate was short: one model at a time instead
        report.emit(dict(section="a", what=spec["what"] + ": both resident ran out of memory", **pair))
        pair = run("a", spec["what"] + " (alternating blocks)",
                   lambda: compare_benchmark((vanilla_name, lm2_name), shape, mb, args.smoke, resident=False))
    lm2 = None
    if pair and "error" not in pair and "oom" not in pair:
        vanilla, lm2 = pair[vanilla_name], pair[lm2_name]
        for name in (vanilla_name, lm2_name):
            report.emit(dict(section="a", what=f"{name} train step (interleaved with the other)", **pair[name]))
        flop_ratio = lm2["gflop_per_token"] / vanilla["gflop_per_token"]
        time_ratio = lm2["median_s"] / vanilla["median_s"]
        report.emit(dict(section="a", what="LM2 / vanilla (medians)", step_time_ratio=time_ratio,
                         flop_ratio=flop_ratio, target=1.10 * flop_ratio, meets_target=time_ratio <= 1.10 * flop_ratio,
                         lm2_mfu_target_0p45=(lm2["mfu"] >= 0.45) if lm2.get("mfu") else None))
    elif pair:
        report.emit(dict(section="a", what=spec["what"], **pair))
    dtype = torch.float32 if args.smoke else torch.bfloat16
    spec = specs[("b", None)]
    result = run("b", spec["what"],
                 lambda: dict(shape=shape["module"], batch=shape["module_batch"], dtype=str(dtype),
                              **memory_module_benchmark(shape["module"], shape["module_batch"], spec["steps"], dtype)))
    if result:
        report.emit(dict(section="b", what=spec["what"], **result))
        skipped = (result.get("flash_parity") or {}).get("skipped")
        if skipped:
            report.emit(dict(section="b", what="memory read forced onto flash attention, parity vs math", skipped=skipped))
    spec = specs[("c", None)]
    result = run("c", spec["what"], lambda: train_step_benchmark(lm2_name, shape, spec["micro_batch"], args.smoke))
    if result:
        report.emit(dict(section="c", what=spec["what"], **result))
    if "d" in args.sections:
        if not te:
            report.emit(dict(section="d", what="FP8", skipped="Transformer Engine does not import (or no GPU)"))
        else:
            for recipe in ("delayed", "tensorwise", "blockwise"):
                spec = specs[("d", recipe)]
                result = run("d", spec["what"],
                             lambda r=recipe: train_step_benchmark(lm2_name, shape, mb, args.smoke, fp8_recipe=r))
                if result:
                    if lm2 and "tokens_per_s" in result:
                        result["speedup_over_bf16"] = result["tokens_per_s"] / lm2["tokens_per_s"]
                        result["target_speedup"] = 1.35
                    report.emit(dict(section="d", what=spec["what"], **result))
    report.emit(dict(section="done", total_s=round(time.perf_counter() - report.start, 1)))
    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
