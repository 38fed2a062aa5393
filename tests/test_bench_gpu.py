"""benchmarks/bench_gpu.py on a CPU: sections release their models, interleaved timings and
their medians, the MFU peak by device name, --out, --plan, the flash parity check's CPU skip,
and the carry folder's size check (issue 34)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import bench_gpu  # noqa: E402


@pytest.fixture
def watched_models(monkeypatch):
    """Weak references to every model chunk the benchmark builds (DDP wrapper and module)."""
    from megatron_lm2.training import build

    refs = []
    real = build.build_model_chunks

    def recording(train, config):
        chunks = real(train, config)
        for chunk in chunks:
            refs.append(weakref.ref(chunk))
            refs.append(weakref.ref(chunk.module))
        return chunks

    monkeypatch.setattr(build, "build_model_chunks", recording)
    return refs


def _without_collector(fn, refs):
    """Run fn with the automatic collector off and say which watched models are still alive
    before turning it back on: a model freed only by a lucky collection stays alive, so what
    is freed is what the benchmark frees itself."""
    gc.collect()
    gc.disable()
    try:
        result = fn()
        alive = [ref() is not None for ref in refs]
    finally:
        gc.enable()
    return result, alive


@pytest.mark.usefixtures("megatron_world", "one_thread")
def test_a_section_leaves_no_model_behind(watched_models):
    result, alive = _without_collector(
        lambda: bench_gpu.train_step_benchmark("debug", bench_gpu.SMOKE, 2, True), watched_models)
    assert result["tokens_per_s"] > 0
    assert alive and not any(alive), "a model outlived its section"


@pytest.mark.usefixtures("megatron_world", "one_thread")
@pytest.mark.parametrize("resident", [True, False])
def test_the_comparison_leaves_no_model_behind(watched_models, resident):
    pair, alive = _without_collector(lambda: bench_gpu.compare_benchmark(
        ("debug-vanilla", "debug"), bench_gpu.SMOKE, 2, True, resident=resident), watched_models)
    assert set(pair) == {"debug-vanilla", "debug"}
    assert all(pair[name]["steps"] >= 5 for name in pair)
    assert len(alive) == (4 if resident else 8)
    assert not any(alive), "a model outlived its section"


def test_interleaved_timing_reports_the_true_ratio():
    """Fake steps on a fake clock: LM2 truly takes 2x vanilla, but the machine slows down
    steadily (drift) and the first calls are cold. Timing one model after the other would
    put the drift on the second; interleaving and medians do not."""
    now = [0.0]
    calls = [0]

    def fake(base):
        def step():
            index = calls[0]
            calls[0] += 1
            cold = 5.0 if index < 4 else 0.0
            now[0] += base * (1 + 0.05 * index) + cold
        return step

    steps = {"vanilla": fake(1.0), "lm2": fake(2.0)}
    timing = bench_gpu.interleaved_timing(steps, warmup=3, repeats=10, clock=lambda: now[0], sync=lambda: None)
    assert timing["vanilla"]["steps"] == timing["lm2"]["steps"] == 10
    assert timing["lm2"]["median_s"] / timing["vanilla"]["median_s"] == pytest.approx(2.0, rel=0.02)
    assert timing["lm2"]["spread"] > 0 and timing["lm2"]["min_s"] <= timing["lm2"]["median_s"] <= timing["lm2"]["max_s"]
    # The same steps timed in two blocks (the old way) would miss the ratio by far:
    now[0], calls[0] = 0.0, 0
    blocks = {}
    for name in ("vanilla", "lm2"):
        start = now[0]
        for _ in range(10):
            steps[name]()
        blocks[name] = now[0] - start
    assert abs(blocks["lm2"] / blocks["vanilla"] - 2.0) > 0.2


@pytest.mark.parametrize("name, bf16, fp8", [
    ("NVIDIA H100 80GB HBM3", 989.0, 1979.0),  # SXM
    ("NVIDIA H100 NVL", 835.0, 1671.0),
    ("NVIDIA H100 PCIe", 756.0, 1513.0),
    ("NVIDIA H200", 989.0, 1979.0),
    ("NVIDIA H200 NVL", 835.0, 1671.0),
])
def test_peak_by_device_name(name, bf16, fp8, monkeypatch):
    from megatron_lm2.training.metrics import peak_tflops

    assert (peak_tflops(name, "bf16"), peak_tflops(name, "fp8")) == (bf16, fp8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert bench_gpu.bf16_peak() == (bf16, name)  # the benchmark's one convention: dense BF16


def test_cpu_has_no_peak():
    from megatron_lm2.training.metrics import peak_tflops

    assert peak_tflops("cpu", "bf16") is None


def test_smoke_writes_json_and_markdown(tmp_path):
    out = tmp_path / "run" / "gpu_run.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--smoke",
                           "--sections", "ab", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads(out.read_text())["records"]
    machine = records[0]
    assert machine["section"] == "machine"
    for key in ("device", "date", "commit", "mfu_convention"):
        assert machine[key]
    ratio = next(r for r in records if r.get("what") == "LM2 / vanilla (medians)")
    assert ratio["step_time_ratio"] > 0
    assert any("flash" in r.get("what", "") and "CUDA-only" in r.get("skipped", "") for r in records)
    table = (tmp_path / "run" / "gpu_run.md").read_text()
    assert machine["device"] in table and machine["commit"] in table
    assert "| a | debug train step" in table


@pytest.mark.usefixtures("megatron_world")
@pytest.mark.parametrize("smoke", [True, False])
def test_plan_parameter_bytes_match_the_built_model(smoke):
    from megatron_lm2.model import build_model

    rows = bench_gpu.plan_sections(smoke)
    assert [r["section"] for r in rows] == ["a", "b", "c", "d", "d", "d"]
    shape = bench_gpu.SMOKE if smoke else bench_gpu.FULL
    checked = set()
    for row in rows:
        for model in row.get("models", []):
            if model["flavor"] in checked:
                continue
            checked.add(model["flavor"])
            train = bench_gpu._train_config(model["flavor"], shape, row["micro_batch"], None, smoke)
            config = train.model_config().replace(perform_initialization=False)
            with torch.device("meta"):
                built = sum(p.numel() for p in build_model(config).parameters())
            bytes_per_parameter = 4 if smoke else 2  # fp32 smoke, bf16 weights on the GPU
            assert model["parameters"] == built
            assert model["parameter_bytes"] == built * bytes_per_parameter
    assert len(checked) == 2


def test_plan_prints_every_section_and_runs_nothing(capsys, monkeypatch):
    monkeypatch.setattr(bench_gpu, "compare_benchmark", lambda *a, **k: pytest.fail("--plan ran a section"))
    monkeypatch.setattr(bench_gpu, "train_step_benchmark", lambda *a, **k: pytest.fail("--plan ran a section"))
    assert bench_gpu.main(["--plan"]) == 0
    text = capsys.readouterr().out
    for needle in ("[a] llama-1.7b vs lm2-1.7b", "[b] memory module", "[c] lm2-1.7b", "FP8 blockwise",
                   "micro-batch 4", "seq 2048", "10 timed steps", "expected in memory at once"):
        assert needle in text


def test_flash_parity_skips_on_cpu_with_a_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parity = bench_gpu.flash_parity(None, None)
    assert parity["flash"] is False and "CUDA-only" in parity["skipped"]


@pytest.mark.gpu
@pytest.mark.usefixtures("megatron_world")
def test_flash_parity_on_gpu():
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.specs import get_memory_local_spec

    cfg = get_flavor("debug", params_dtype=torch.bfloat16, **bench_gpu.SMOKE["module"])
    module = build_module(get_memory_local_spec(), config=cfg, layer_number=1).cuda()
    tokens = torch.randn(cfg.seq_length, 2, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    parity = bench_gpu.flash_parity(module, tokens)
    assert parity["flash"] and parity["max_rel_diff_flash_vs_math"] <= bench_gpu.BF16_TOLERANCE


def test_carry_folder_size_check(tmp_path):
    import carry_size

    folder = tmp_path / "wheels"
    folder.mkdir()
    (folder / "a.whl").write_bytes(b"x" * 3000)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.whl").write_bytes(b"x" * 2000)
    assert carry_size.folder_bytes(folder) == 5000
    assert carry_size.check(folder, limit_bytes=5000) == 0
    assert carry_size.check(folder, limit_bytes=4999) == 1
    assert carry_size.LIMIT_BYTES == 64 * 2**20


def test_flash_refused_is_reported_not_fatal(monkeypatch):
    """Where flash attention cannot take the memory's SDPA calls, section b still times the
    default backend and says why flash was not used."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_gpu, "_with_flash", lambda fn: (_ for _ in ()).throw(RuntimeError("No available kernel.")))
    parity = bench_gpu.flash_parity(lambda tokens: (tokens,), torch.zeros(2))
    assert parity["flash"] is False and "No available kernel" in parity["skipped"]
