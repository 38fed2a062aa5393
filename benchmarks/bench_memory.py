"""Benchmark the LM2 memory: throughput and activation memory of LM2 vs its vanilla twin,
and how the memory path's cost grows with the number of chunks (it must be linear).

    python benchmarks/bench_memory.py                  # CPU: debug scale
    python benchmarks/bench_memory.py --gpu-1p7b       # CUDA: 1.7B-shaped layers in bf16

Memory column: on CUDA, peak allocated bytes; on CPU, the bytes autograd saves for backward
(activation memory, the part that grows with sequence length), measured with
saved_tensors_hooks. Ratios are within one run on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # memory_baseline


@contextlib.contextmanager
def saved_bytes_counter(exclude=()):
    """Bytes autograd holds for backward at the end of the block (the CPU proxy for activation
    memory): the storages of every tensor saved inside it, counted once each, measured when
    the block ends (so storage a module releases until backward is not counted). Storages of
    `exclude` tensors (parameters) are left out; total[0] is set on exit."""
    # Keyed by the storage itself, not its address: a storage released with resize_(0) frees
    # its memory, and a later saved tensor may be allocated at the same address.
    saved, skip, total = {}, {t.untyped_storage()._cdata for t in exclude}, [0]

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in skip:
            saved.setdefault(key, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    total[0] = sum(t.untyped_storage().nbytes() for t in saved.values())


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _peak(fn) -> int:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated()
    with saved_bytes_counter() as total:
        fn()
    return total[0]


def model_table(flavor: str, batch: int, repeats: int, device) -> list[tuple]:
    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.model import build_model

    rows = []
    for name, overrides in ((flavor, {}), (flavor, {"memory_layers": ()})):
        cfg = get_flavor(name, **overrides)
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length), device=device)
        positions = torch.arange(cfg.seq_length, device=device).expand(batch, -1)

        def step():
            loss = model(tokens, positions, None, labels=tokens).mean()
            loss.backward()

        seconds = _time(step, repeats)
        label = "LM2" if cfg.has_memory else "vanilla"
        rows.append((label, batch * cfg.seq_length / seconds, _peak(step)))
    return rows


def chunk_table(chunks: list[int], batch: int, repeats: int, device, dtype, **shape) -> list[tuple]:
    """The memory module alone, fixed chunk size, sequence = chunks x chunk size."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.specs import get_memory_local_spec

    rows = []
    for count in chunks:
        cfg = get_flavor("debug", params_dtype=dtype, **{**shape, "seq_length": count * shape["memory_chunk_size"]})
        module = build_module(get_memory_local_spec(), config=cfg, layer_number=1).to(device)
        tokens = torch.randn(cfg.seq_length, batch, cfg.hidden_size, device=device, dtype=dtype,
                             requires_grad=True)

        def step():
            out, _ = module(tokens)
            out.float().sum().backward()

        seconds = _time(step, repeats)
        rows.append((count, cfg.seq_length, seconds, _peak(step)))
    return rows


def old_vs_new(batch: int, repeats: int, device, dtype, **shape) -> dict:
    """The memory module alone, fwd+bwd: the SDPA path (megatron_lm2.memory) against the
    explicit-score path it replaced (benchmarks/memory_baseline.py), same weights and input."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.specs import get_memory_local_spec
    from memory_baseline import explicit_forward

    cfg = get_flavor("debug", params_dtype=dtype, **shape)
    torch.manual_seed(0)
    module = build_module(get_memory_local_spec(), config=cfg, layer_number=1).to(device)
    tokens = torch.randn(cfg.seq_length, batch, cfg.hidden_size, device=device, dtype=dtype,
                         requires_grad=True)
    params = list(module.parameters())
    result = {}
    for name, forward in (("old", lambda: explicit_forward(module, tokens)), ("new", lambda: module(tokens))):
        with saved_bytes_counter(exclude=params) as saved:
            out, _ = forward()
        grads = torch.autograd.grad(out.float().square().sum(), [tokens] + params)

        def step():
            o, _ = forward()
            o.float().sum().backward()

        seconds = _time(step, repeats)
        peak = _peak(step) if torch.cuda.is_available() else None
        result[name] = dict(saved=saved[0], seconds=seconds, peak=peak, out=out.detach(), grads=grads)
    result["max_diff_out"] = (result["old"]["out"] - result["new"]["out"]).abs().max().item()
    result["max_rel_diff_grad"] = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(result["old"]["grads"], result["new"]["grads"])
    )
    return result


def _commit() -> str:
    from megatron_lm2.provenance import git_commit

    return git_commit()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-1p7b", action="store_true",
                        help="1.7B-shaped layers in bf16 on CUDA instead of the debug scale")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-chunks", type=int, default=64)
    args = parser.parse_args(argv)

    from megatron_lm2 import distributed

    distributed.initialize()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    if args.gpu_1p7b and not cuda:
        sys.exit("--gpu-1p7b needs a CUDA GPU")
    machine = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    print(f"# machine: {machine}; torch {torch.__version__}; commit {_commit()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    chunks = [c for c in (1, 2, 4, 8, 16, 32, 64) if c <= args.max_chunks]

    if args.gpu_1p7b:
        shape = dict(hidden_size=2048, num_attention_heads=32, memory_slots=2048, memory_heads=8,
                     memory_chunk_size=1024)
        dtype, batch, chunks = torch.bfloat16, 1, [c for c in chunks if c <= 16]
    else:
        rows = model_table("debug", batch=4, repeats=args.repeats, device=device)
        print("\n## Debug flavor, forward+backward, batch 4 x 256 tokens")
        print("| model | tokens/s | activation MiB | tokens/s vs vanilla |")
        print("|---|---|---|---|")
        vanilla = rows[1][1]
        for label, tps, peak in rows:
            print(f"| {label} | {tps:,.0f} | {peak / 2**20:.1f} | {tps / vanilla:.2f} |")
        shape = dict(hidden_size=128, num_attention_heads=4, memory_slots=32, memory_heads=4,
                     memory_chunk_size=64)
        dtype, batch = torch.float32, 2

    if args.gpu_1p7b:
        module_shape = dict(hidden_size=2048, num_attention_heads=32, memory_slots=2048, memory_heads=8,
                            memory_chunk_size=1024, seq_length=2048)
        module_batch = 4
    else:
        module_shape = dict(hidden_size=512, num_attention_heads=4, memory_slots=1024, memory_heads=2,
                            memory_chunk_size=1024, seq_length=2048)
        module_batch = 1
    r = old_vs_new(module_batch, args.repeats, device, dtype, **module_shape)
    print(f"\n## One memory module, old path (explicit scores) vs new (SDPA), fwd+bwd: T={module_shape['seq_length']}, "
          f"d={module_shape['hidden_size']}, N={module_shape['memory_slots']}, C={module_shape['memory_chunk_size']}, "
          f"{module_shape['memory_heads']} heads, batch {module_batch}, {dtype}")
    print("| path | saved for backward MiB (no weights) | ms | peak MiB |")
    print("|---|---|---|---|")
    for name in ("old", "new"):
        row = r[name]
        peak = f"{row['peak'] / 2**20:.0f}" if row["peak"] else "n/a (CPU)"
        print(f"| {name} | {row['saved'] / 2**20:.1f} | {row['seconds'] * 1e3:.1f} | {peak} |")
    print(f"max |out_old - out_new| = {r['max_diff_out']:.2e}; max relative gradient difference "
          f"{r['max_rel_diff_grad']:.2e}")

    rows = chunk_table(chunks, batch, args.repeats, device, dtype, **shape)
    print(f"\n## Memory path alone vs number of chunks (C={shape['memory_chunk_size']}, "
          f"N={shape['memory_slots']}, d={shape['hidden_size']}, batch {batch}, {dtype}), fwd+bwd")
    print("| chunks | tokens | ms | ms per chunk | memory MiB | MiB per chunk | time / (K x time of 1) |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0][2]
    for count, tokens, seconds, peak in rows:
        print(f"| {count} | {tokens} | {seconds * 1e3:.1f} | {seconds * 1e3 / count:.2f} | "
              f"{peak / 2**20:.1f} | {peak / 2**20 / count:.2f} | {seconds / (count * base):.2f} |")
    distributed.destroy()


if __name__ == "__main__":
    main()
