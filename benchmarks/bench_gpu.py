"""One-GPU benchmark of LM2 against its vanilla twin, most important numbers first, as JSON lines.

    python benchmarks/bench_gpu.py --out gpu.jsonl          # one H100/H200, <= 8 minutes
    python benchmarks/bench_gpu.py --smoke                  # CPU, tiny shapes: checks the script

Sections (each line is written and flushed as soon as it is measured; a section that would
not fit in --budget-s is skipped with a line saying so):
  a  llama-1.7b vs lm2-1.7b, 16 layers, bf16, micro-batch 4 x 2048 tokens, the trainer's own
     step (DDP + distributed optimizer, runtime settings of training/build.py; TE spec if
     Transformer Engine imports, else local): tokens/s, TFLOP/s, MFU, peak memory; then the
     LM2/vanilla step-time ratio against 1.10 x the executed-FLOP ratio.
  b  one memory module at the 1.7B shape, the old explicit-score path
     (benchmarks/memory_baseline.py) vs the SDPA path: time, peak memory, max differences,
     top CUDA kernels (torch.profiler).
  c  lm2-1.7b at micro-batch 8, if it fits.
  d  lm2-1.7b in FP8, each recipe (delayed, tensorwise, blockwise), when TE is present:
     tokens/s against bf16 (target >= 1.35x).
benchmarks/README.md says how to run it where megatron-core is not installed; results go to
benchmarks/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
SMOKE = dict(seq_length=128, micro_batch_size=2, steps=1, warmup=1,
             model_overrides=dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                  num_query_groups=4, vocab_size=512, memory_slots=64, memory_heads=4,
                                  memory_chunk_size=64),
             module=dict(hidden_size=64, num_attention_heads=4, memory_slots=64, memory_heads=4,
                         memory_chunk_size=64, seq_length=128), module_batch=2)


class Report:
    def __init__(self, path, budget_s: float):
        self.file = open(path, "a") if path else None
        self.start = time.perf_counter()
        self.budget = budget_s

    def emit(self, record: dict) -> None:
        record = {"t_s": round(time.perf_counter() - self.start, 1), **record}
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


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


# ----------------------------------------------------------------------- a, c, d: the training step
def _train_config(flavor: str, shape: dict, micro_batch: int, fp8_recipe, smoke: bool):
    from megatron_lm2.training.config import parse_args

    argv = ["--flavor", flavor, "--mock-data", "--micro-batch-size", str(micro_batch),
            "--global-batch-size", str(micro_batch), "--train-iters", "1000", "--lr-warmup-iters", "10",
            "--seq-length", str(shape["seq_length"])]
    if not smoke:
        argv.append("--bf16")
    for key, value in shape.get("model_overrides", {}).items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    if fp8_recipe:
        argv += ["--fp8-format", "hybrid", "--fp8-recipe", fp8_recipe]
    return parse_args(argv, world_size=1)


def train_step_benchmark(flavor: str, shape: dict, micro_batch: int, smoke: bool, fp8_recipe=None) -> dict:
    """The trainer's step (forward_backward_func + distributed optimizer) on random tokens."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_lm2.accounting import flops_per_token
    from megatron_lm2.training.build import (
        build_model_chunks,
        build_optimizer,
        set_schedule_hooks,
        transformer_backend,
    )
    from megatron_lm2.training.metrics import peak_tflops

    train = _train_config(flavor, shape, micro_batch, fp8_recipe, smoke)
    config = train.model_config()
    backend = transformer_backend(train)
    torch.manual_seed(0)
    model_chunks = build_model_chunks(train, config)
    set_schedule_hooks(config, model_chunks)
    optimizer, _ = build_optimizer(train, config, model_chunks)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    seq = config.seq_length
    tokens = torch.randint(0, config.vocab_size, (micro_batch, seq), device=device)
    positions = torch.arange(seq, device=device).expand(micro_batch, -1)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().sum()
        count = torch.tensor(per_token_loss.numel(), device=loss.device, dtype=torch.int)
        return loss, count, {"lm loss": torch.stack([loss.detach(), count.float()])}

    def forward_step(_iterator, model):
        return model(tokens, positions, None, labels=tokens), loss_func  # the model's own mask

    forward_backward = get_forward_backward_func()

    def step():
        for model_chunk in model_chunks:
            model_chunk.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=forward_step, data_iterator=iter([None]), model=model_chunks,
                         num_microbatches=1, seq_length=seq, micro_batch_size=micro_batch,
                         decoder_seq_length=seq, forward_only=False)
        optimizer.step()

    for _ in range(shape["warmup"]):
        step()
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(shape["steps"]):
        step()
    _sync()
    seconds = (time.perf_counter() - start) / shape["steps"]
    kernel = "te" if backend == "te" else "local"
    fpt = flops_per_token(config, kernel=kernel, micro_batch_size=micro_batch)
    tokens_per_s = micro_batch * seq / seconds
    dtype = "fp8" if fp8_recipe else ("bf16" if config.bf16 else "fp32")
    peak = peak_tflops(torch.cuda.get_device_name(), dtype) if torch.cuda.is_available() else None
    tflops = tokens_per_s * fpt / 1e12
    result = dict(flavor=flavor, backend=backend, micro_batch=micro_batch, seq=seq, dtype=dtype,
                  fp8_recipe=fp8_recipe, step_s=seconds, tokens_per_s=tokens_per_s,
                  gflop_per_token=fpt / 1e9, tflops=tflops, mfu=(tflops / peak if peak else None),
                  peak_memory_gib=(torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None))
    del model_chunks, optimizer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


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
    paths = {"old": lambda: explicit_forward(module, tokens)[0], "new": lambda: module(tokens)[0]}
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
    return result


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


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="append the JSON lines to this file too")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks that the script runs")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip sections that would start after this")
    parser.add_argument("--sections", default="abcd", help="which sections to run (default: abcd)")
    args = parser.parse_args(argv)
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
    report.emit(dict(section="machine", smoke=args.smoke, **_machine()))
    te = te_available() and torch.cuda.is_available()
    # Rough section costs (s) on an H100, to stay inside the budget.
    costs = {"a": 150, "b": 60, "c": 60, "d": 150}

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
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001  (one failing section must not lose the others)
            result = dict(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=3))
        report.emit(dict(section=section, what=label, **result))
        return result

    mb = shape["micro_batch_size"]
    names = ("debug-vanilla", "debug") if args.smoke else ("llama-1.7b", "lm2-1.7b")
    vanilla = run("a", f"{names[0]} train step", lambda: train_step_benchmark(names[0], shape, mb, args.smoke))
    lm2 = run("a", f"{names[1]} train step", lambda: train_step_benchmark(names[1], shape, mb, args.smoke))
    if vanilla and lm2 and "step_s" in vanilla and "step_s" in lm2:
        flop_ratio = lm2["gflop_per_token"] / vanilla["gflop_per_token"]
        time_ratio = lm2["step_s"] / vanilla["step_s"]
        report.emit(dict(section="a", what="LM2 / vanilla", step_time_ratio=time_ratio, flop_ratio=flop_ratio,
                         target=1.10 * flop_ratio, meets_target=time_ratio <= 1.10 * flop_ratio,
                         lm2_mfu_target_0p45=(lm2["mfu"] >= 0.45) if lm2.get("mfu") else None))
    dtype = torch.float32 if args.smoke else torch.bfloat16
    run("b", "memory module, old path vs SDPA path, fwd+bwd",
        lambda: dict(shape=shape["module"], batch=shape["module_batch"], dtype=str(dtype),
                     **memory_module_benchmark(shape["module"], shape["module_batch"], 2 if args.smoke else 5, dtype)))
    run("c", f"{names[1]} train step, micro-batch {2 * mb}",
        lambda: train_step_benchmark(names[1], shape, 2 * mb, args.smoke))
    if "d" in args.sections:
        if not te:
            report.emit(dict(section="d", what="FP8", skipped="Transformer Engine does not import (or no GPU)"))
        else:
            for recipe in ("delayed", "tensorwise", "blockwise"):
                result = run("d", f"{names[1]} train step, FP8 {recipe}",
                             lambda r=recipe: train_step_benchmark(names[1], shape, mb, args.smoke, fp8_recipe=r))
                if result and lm2 and "tokens_per_s" in result and "tokens_per_s" in lm2:
                    report.emit(dict(section="d", what=f"FP8 {recipe} / bf16 tokens/s",
                                     ratio=result["tokens_per_s"] / lm2["tokens_per_s"], target=1.35))
    report.emit(dict(section="done", total_s=round(time.perf_counter() - report.start, 1)))
    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
