"""Checkpoints: resume is exact (bit for bit on CPU fp32), a save killed with SIGKILL leaves the
previous checkpoint loadable, old checkpoints are pruned, and another TP/PP layout resumes a
checkpoint (weights, distributed-optimizer state and schedule) to the same losses."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_lm2.testing import run_distributed

COMMON = [
    "--flavor", "debug", "--mock-data", "--num-layers", "2", "--seq-length", "64",
    "--memory-chunk-size", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--train-iters", "8", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2",
    "--log-interval", "1",
]


def _cli(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "megatron_lm2.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True, **kwargs)


def _run(args):
    process = _cli(args)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def _losses(metrics_file):
    """step -> (loss, grad norm) from metrics.jsonl (later lines win: a resumed run rewrites)."""
    result = {}
    with open(metrics_file) as handle:
        for line in handle:
            record = json.loads(line)
            if record["kind"] == "train":
                result[record["step"]] = (record["loss"], record["grad_norm"])
    return result


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """8 steps at TP1/PP1, a checkpoint every 2 steps (all kept)."""
    directory = str(tmp_path_factory.mktemp("uninterrupted"))
    _run(COMMON + ["--save", directory, "--save-interval", "2", "--keep-last", "0"])
    return directory, _losses(os.path.join(directory, "metrics.jsonl"))


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return uninterrupted_run[1]


def test_resume_is_bit_exact(tmp_path, uninterrupted):
    directory = str(tmp_path)
    first = _run(COMMON + ["--save", directory, "--exit-interval", "3"])
    assert "exiting at step 3: --exit-interval 3" in first
    with open(os.path.join(directory, "latest")) as handle:
        assert handle.read().strip() == "iter_0000003"
    second = _run(COMMON + ["--save", directory])
    assert f"resumed from {os.path.join(directory, 'iter_0000003')} at step 3 (12 samples consumed)" in second
    resumed = _losses(os.path.join(directory, "metrics.jsonl"))
    assert sorted(resumed) == list(range(1, 9))
    # Identical floats: data position, optimizer, schedule and RNG all came back.
    assert resumed == uninterrupted
    assert len({loss for loss, _ in uninterrupted.values()}) == 8


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, uninterrupted):
    directory = str(tmp_path)
    args = COMMON + ["--save", directory, "--save-interval", "2", "--keep-last", "2"]
    process = _cli(args)
    tracker, in_progress = os.path.join(directory, "latest"), os.path.join(directory, ".tmp-iter_0000004")
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            if os.path.isdir(in_progress) and os.path.isfile(tracker):
                break
            time.sleep(0.005)
        assert process.poll() is None, "training ended before the save of step 4 could be interrupted"
        os.killpg(process.pid, signal.SIGKILL)  # the trainer and its checkpoint writer processes
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    # Killed while writing step 4: the tracker still names step 2, which is complete.
    with open(tracker) as handle:
        assert handle.read().strip() == "iter_0000002"
    assert os.path.isdir(in_progress) and not os.path.exists(os.path.join(directory, "iter_0000004"))

    output = _run(args)
    assert f"resumed from {os.path.join(directory, 'iter_0000002')} at step 2" in output
    resumed = _losses(os.path.join(directory, "metrics.jsonl"))
    for step in range(3, 9):
        assert resumed[step] == uninterrupted[step], step
    # keep-last 2 pruned older checkpoints; the interrupted save's debris is gone.
    entries = sorted(e for e in os.listdir(directory) if "iter_" in e)
    assert entries == ["iter_0000006", "iter_0000008"]


def test_sigusr1_saves_and_exits(tmp_path):
    """Slurm's preemption warning: finish the step, save, exit 0."""
    directory = str(tmp_path)
    process = _cli(COMMON[:COMMON.index("--train-iters")] + [
        "--train-iters", "500", "--lr-warmup-iters", "2", "--log-interval", "1", "--save", directory])
    metrics = os.path.join(directory, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    step = max(_losses(metrics))
    assert 1 <= step < 500
    assert f"exiting at step {step}: signal SIGUSR1" in output
    with open(os.path.join(directory, "latest")) as handle:
        assert handle.read().strip() == f"iter_{step:07d}"


# ------------------------------------------------------------------ another TP / PP layout
def _train(argv):
    import torch.distributed as dist

    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    trainer = Trainer(parse_args(argv, world_size=dist.get_world_size()))
    history = trainer.run()
    return dict(losses={r["step"]: r["loss"] for r in history}, resumed_from=trainer.resumed_from)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["to-tp2", "to-pp2"])
def test_resume_at_another_layout(uninterrupted_run, tp, pp):
    directory, expected = uninterrupted_run
    checkpoint = os.path.join(directory, "iter_0000006")
    argv = COMMON + ["--load", checkpoint, "--tensor-model-parallel-size", str(tp),
                     "--pipeline-model-parallel-size", str(pp)]
    for result in run_distributed(_train, 2, argv, tp=tp, pp=pp):
        assert result["resumed_from"] == checkpoint
        assert sorted(result["losses"]) == [7, 8]
        # Steps 7 and 8 need the step-6 weights AND Adam moments and schedule, resharded.
        got = [result["losses"][s] for s in (7, 8)]
        want = [expected[7][0], expected[8][0]]
        assert np.allclose(got, want, rtol=1e-5, atol=0), (got, want)


def _weights_after(argv):
    from megatron_lm2.training.checkpoint import unwrap
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    trainer = Trainer(parse_args(argv))
    weights = {n: p.detach().clone() for n, p in unwrap(trainer.model_chunks[0]).named_parameters()}
    inner = trainer.optimizer.chained_optimizers[0].optimizer
    adam_steps = {float(s["step"]) for s in inner.state.values() if "step" in s}
    return weights, trainer.step, trainer.scheduler.num_steps, adam_steps


def test_init_from_loads_weights_only(uninterrupted_run, tmp_path):
    directory, _ = uninterrupted_run
    source = os.path.join(directory, "iter_0000002")
    init = run_distributed(_weights_after, 1, COMMON + ["--init-from", source, "--save", str(tmp_path)])[0]
    resumed = run_distributed(_weights_after, 1, COMMON + ["--load", source])[0]
    fresh = run_distributed(_weights_after, 1, COMMON)[0]
    # The trained weights of step 2, exactly; but step 0, a fresh schedule and no Adam state.
    assert init[0].keys() == resumed[0].keys()
    assert all(init[0][n].equal(resumed[0][n]) for n in init[0])
    assert not all(init[0][n].equal(fresh[0][n]) for n in init[0])
    assert (init[1], init[2], init[3]) == (0, 0, set())
    assert (resumed[1], resumed[2], resumed[3]) == (2, 2, {2.0})


def test_latest_tracker_errors_are_clear(tmp_path):
    from megatron_lm2.training.checkpoint import latest_checkpoint

    assert latest_checkpoint(str(tmp_path)) is None
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(RuntimeError, match="names 'iter_0000009', which is not a checkpoint directory"):
        latest_checkpoint(str(tmp_path))


# ------------------------------------------------------------------ the model config it carries
def _converter_view(path):
    """(lm2_config.json-style dict, weights) of a checkpoint as lm2-convert / lm2-eval load it."""
    from megatron_lm2.convert.megatron_config import config_to_dict
    from megatron_lm2.convert.megatron_io import load_checkpoint

    config, weights = load_checkpoint(path)
    return config_to_dict(config), {name: tensor.clone() for name, tensor in weights.items()}


def test_every_checkpoint_carries_its_model_config(uninterrupted_run, tmp_path):
    import shutil

    from megatron_lm2.convert.megatron_config import config_to_dict
    from megatron_lm2.training import integrity
    from megatron_lm2.training.config import parse_args

    directory, _ = uninterrupted_run
    expected = config_to_dict(parse_args(COMMON, world_size=1).model_config())
    for step in (2, 4, 6, 8):
        path = os.path.join(directory, f"iter_{step:07d}")
        with open(os.path.join(path, "lm2_config.json")) as handle:
            record = json.load(handle)
        assert record["model"] == expected, step
        assert (record["tensor_model_parallel_size"], record["pipeline_model_parallel_size"]) == (1, 1)
        # Covered by the checkpoint's checksums.
        entry = integrity.read_record(path)["files"]["lm2_config.json"]
        assert entry["sha256"] == integrity.file_digest(os.path.join(path, "lm2_config.json"))

    # A checkpoint of today's trainer without lm2_config.json (as one from before it was written):
    # the converter rebuilds the same model from the run's saved flags, and loads the same weights.
    source = os.path.join(directory, "iter_0000008")
    older = str(tmp_path / "iter_0000008")
    shutil.copytree(source, older)
    os.remove(os.path.join(older, "lm2_config.json"))
    assert "lm2_config.json: missing (the checkpoint's integrity record lists it)" in integrity.verify(older)
    record = integrity.read_record(older)
    del record["files"]["lm2_config.json"]
    with open(os.path.join(older, integrity.INTEGRITY_FILE), "w") as handle:
        json.dump(record, handle)
    (with_record, weights), (rebuilt, weights_rebuilt) = run_distributed(_converter_view, 1, source)[0], \
        run_distributed(_converter_view, 1, older)[0]
    assert with_record == expected
    assert rebuilt == with_record
    assert sorted(weights) == sorted(weights_rebuilt)
    assert all(weights[name].equal(weights_rebuilt[name]) for name in weights)
