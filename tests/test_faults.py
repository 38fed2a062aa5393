"""Fault injection on training and conversion (issue 9): huge learning rates and non-finite
weights never reach a known-good checkpoint and the halt names the one that is; damaged or
truncated checkpoint files are refused naming the file (or skipped with --load-fallback);
checkpoints from before the checksums still load; truncated data shards are refused at
start-up; every CLI ends bad input with one line and exit code 2; a resumed run's
metrics.jsonl has each step once; no helper process outlives the trainer; the WSD schedule and
the validation loss by memory chunk."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from megatron_lm2.testing import run_distributed

COMMON = [
    "--flavor", "debug", "--mock-data", "--num-layers", "2", "--seq-length", "64",
    "--memory-chunk-size", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1", "--log-interval", "1",
]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "LM2_DEBUG"):
        env.pop(key, None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _module(module, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _train(*args):
    return _module("megatron_lm2.train", *args)


def _one_line_error(result, prog):
    """Exit 2, one stderr line `prog: error: ...`, no traceback; returns the line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def _train_records(path):
    with open(path) as handle:
        records = [json.loads(line) for line in handle]
    return [r for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """4 steps, checkpoints at 2 and 4 (all kept)."""
    directory = str(tmp_path_factory.mktemp("run") / "ckpt")
    result = _train(*COMMON, "--train-iters", "4", "--save", directory, "--save-interval", "2",
                    "--keep-last", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = {r["step"]: r["loss"] for r in _train_records(os.path.join(directory, "metrics.jsonl"))}
    return directory, losses


def _copy(run_dir, tmp_path):
    directory = str(tmp_path / "ckpt")
    shutil.copytree(run_dir, directory)
    return directory


def _shard(checkpoint):
    return sorted(f for f in os.listdir(checkpoint) if f.endswith(".distcp"))[0]


# ------------------------------------------------------------------------ flag validation
@pytest.mark.parametrize("argv,flag", [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--min-lr", "inf"], "--min-lr"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--clip-grad", "inf"], "--clip-grad"),
    (["--adam-eps", "inf"], "--adam-eps"), (["--adam-beta2", "nan"], "--adam-beta2"),
])
def test_float_flags_must_be_finite(argv, flag, capsys):
    from megatron_lm2.training.config import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--mock-data", *argv], world_size=1)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"argument {flag}: must be a finite number, got {argv[1]}" in err[0], err


# ---------------------------------------------------------------- non-finite steps
def _all_finite(argv):
    """Resume a trainer from a checkpoint (weights, optimizer, schedule); count its weights and
    the finite ones."""
    from megatron_lm2.training.checkpoint import unwrap
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    trainer = Trainer(parse_args(argv))
    params = list(unwrap(trainer.model_chunks[0]).parameters())
    return trainer.step, len(params), sum(bool(torch.isfinite(p).all()) for p in params)


def test_huge_lr_keeps_a_loadable_finite_checkpoint_and_names_it(tmp_path):
    from megatron_lm2.training.integrity import known_good

    directory = str(tmp_path / "ckpt")
    result = _train(*COMMON, "--lr", "1e6", "--min-lr", "0", "--train-iters", "12", "--save", directory,
                    "--save-interval", "2", "--keep-last", "1", "--max-skipped-steps", "3",
                    "--max-weight-rms", "0", "--divergence-loss-factor", "0")  # the skip path, unguarded
    line = _one_line_error(result, "lm2-train")
    assert "steps in a row had a NaN/Inf loss or gradient" in line
    named = line.split("the newest known-good checkpoint is ")[1].split(" ")[0]
    assert os.path.isdir(named) and known_good(named) is True
    # keep-last 1 kept a newer checkpoint, saved while steps were skipped, and the older
    # known-good one beside it.
    saved = sorted(e for e in os.listdir(directory) if e.startswith("iter_"))
    newest = os.path.join(directory, saved[-1])
    assert newest != named and known_good(newest) is False
    assert saved == sorted([os.path.basename(named), saved[-1]])
    step, count, finite = run_distributed(_all_finite, 1, COMMON + ["--train-iters", "12", "--load", named])[0]
    assert step == int(named[-7:]) and count > 20 and finite == count


def _poisoned_run(argv):
    """A trainer whose update of step 3 leaves an Inf in one weight (finite loss and grads)."""
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    trainer = Trainer(parse_args(argv))
    step = trainer.optimizer.step

    def poisoned_step():
        result = step()
        if trainer.step + 1 == 3:
            with torch.no_grad():
                next(trainer.model_chunks[0].parameters()).view(-1)[7] = float("inf")
        return result

    trainer.optimizer.step = poisoned_step
    try:
        trainer.run()
    except Exception as error:  # noqa: BLE001 - the halt is the result
        return f"{type(error).__name__}: {error}"
    return None


def test_update_with_non_finite_weights_halts_before_saving(tmp_path):
    from megatron_lm2.training.integrity import known_good

    directory = str(tmp_path / "ckpt")
    error = run_distributed(_poisoned_run, 1, COMMON + ["--train-iters", "6", "--save", directory,
                                                         "--save-interval", "1", "--keep-last", "1"])[0]
    good = os.path.join(directory, "iter_0000002")
    assert error.startswith("TrainingHalted: halting at step 2: the update of step 3 made weights "
                            "non-finite"), error
    assert f"the newest known-good checkpoint is {good}" in error
    assert sorted(e for e in os.listdir(directory) if "iter_" in e) == ["iter_0000002"]
    assert open(os.path.join(directory, "latest")).read().strip() == "iter_0000002"
    assert known_good(good) is True


# ------------------------------------------------------------- damaged checkpoints
def test_flipped_bytes_are_refused_naming_the_file_and_fallback_resumes(run_dir, tmp_path):
    source, expected = run_dir
    directory = _copy(source, tmp_path)
    damaged = os.path.join(directory, "iter_0000004", _shard(os.path.join(directory, "iter_0000004")))
    size = os.path.getsize(damaged)
    with open(damaged, "r+b") as handle:  # 64 KiB of random bytes, same size
        handle.seek(size // 3)
        handle.write(np.random.default_rng(0).bytes(min(65536, size // 3)))
    assert os.path.getsize(damaged) == size
    args = [*COMMON, "--train-iters", "4", "--save", directory, "--save-interval", "2", "--keep-last", "0"]

    line = _one_line_error(_train(*args), "lm2-train")
    assert f"{damaged}: sha256 does not match" in line
    assert f"--load-fallback to resume from {os.path.join(directory, 'iter_0000002')}" in line
    # The converter verifies too.
    line = _one_line_error(_module("megatron_lm2.convert.cli", "to-hf", "--load", directory, "--save",
                                   str(tmp_path / "hf")), "lm2-convert")
    assert f"{damaged}: sha256 does not match" in line

    result = _train(*args, "--load-fallback")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {os.path.join(directory, 'iter_0000002')} at step 2" in result.stdout
    assert os.path.isdir(os.path.join(directory, "damaged-iter_0000004"))
    assert open(os.path.join(directory, "latest")).read().strip() == "iter_0000004"
    records = _train_records(os.path.join(directory, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # steps 3, 4 once, from the rerun
    assert {r["step"]: r["loss"] for r in records} == expected


def _train_in_world(argv):
    import torch.distributed as dist

    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    Trainer(parse_args(argv, world_size=dist.get_world_size())).run()
    return dist.get_rank()


def test_two_ranks_hash_and_verify_every_file(tmp_path):
    """DP2: the ranks split the hashing; the record lists every file of both ranks, and the
    split verification of a resumed run refuses a file the other rank hashed."""
    from megatron_lm2.training.integrity import INTEGRITY_FILE, file_digest, read_record, verify

    directory = str(tmp_path / "ckpt")
    argv = COMMON + ["--train-iters", "2", "--save", directory]
    run_distributed(_train_in_world, 2, argv)
    checkpoint = os.path.join(directory, "iter_0000002")
    record = read_record(checkpoint)
    files = sorted(f for f in os.listdir(checkpoint) if f != INTEGRITY_FILE)
    assert sorted(record["files"]) == files and sum(f.endswith(".distcp") for f in files) >= 2
    assert all(record["files"][f]["sha256"] == file_digest(os.path.join(checkpoint, f)) for f in files)
    assert record["known_good"] is True and verify(checkpoint) is None
    last = os.path.join(checkpoint, files[1])  # the second rank's share: files[1::2]
    with open(last, "r+b") as handle:
        byte = handle.read(1)
        handle.seek(0)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(Exception, match=re.escape(f"{last}: sha256 does not match")):
        run_distributed(_train_in_world, 2, COMMON + ["--train-iters", "4", "--save", directory])


def test_truncated_shard_is_refused_naming_the_file(run_dir, tmp_path):
    directory = _copy(run_dir[0], tmp_path)
    shard = os.path.join(directory, "iter_0000004", _shard(os.path.join(directory, "iter_0000004")))
    size = os.path.getsize(shard)
    os.truncate(shard, size // 2)
    line = _one_line_error(_train(*COMMON, "--train-iters", "4", "--save", directory), "lm2-train")
    assert f"{shard}: {size // 2} bytes, the checkpoint recorded {size}" in line


def test_checkpoint_without_checksums_loads_and_a_broken_one_names_the_checkpoint(run_dir, tmp_path):
    """A checkpoint written before lm2_integrity.json existed: resumes to the same losses; if its
    shard is truncated, torch's CheckpointException (a BaseException) becomes one line."""
    from megatron_lm2.training.integrity import INTEGRITY_FILE

    source, expected = run_dir
    directory = _copy(source, tmp_path)
    for name in ("iter_0000002", "iter_0000004"):
        os.remove(os.path.join(directory, name, INTEGRITY_FILE))
    shutil.rmtree(os.path.join(directory, "iter_0000004"))
    with open(os.path.join(directory, "latest"), "w") as handle:
        handle.write("iter_0000002\n")
    legacy = os.path.join(directory, "iter_0000002")
    spare = str(tmp_path / "spare")
    shutil.copytree(legacy, spare)
    args = [*COMMON, "--train-iters", "4", "--save", directory, "--keep-last", "0",
            "--allow-unverified-checkpoint"]

    shard = os.path.join(legacy, _shard(legacy))
    os.truncate(shard, os.path.getsize(shard) // 2)
    line = _one_line_error(_train(*args), "lm2-train")
    assert f"{legacy}: cannot load the checkpoint" in line

    shutil.rmtree(legacy)
    shutil.copytree(spare, legacy)
    result = _train(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {legacy} at step 2" in result.stdout
    losses = {r["step"]: r["loss"] for r in _train_records(os.path.join(directory, "metrics.jsonl"))}
    assert losses == expected


def _flip(path):
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 7)


def _edit_config(path):
    config = json.loads(open(path).read())
    config["hidden_size"] = config.get("hidden_size", 0) + 32
    open(path, "w").write(json.dumps(config))


@pytest.mark.parametrize("target,damage,expect", [
    ("shard", _flip, "sha256 does not match"),
    ("shard", _truncate, "bytes, the checkpoint recorded"),
    ("shard", os.remove, "missing"),
    ("lm2_config.json", _edit_config, "damaged file"),
    ("lm2_integrity.json", lambda p: open(p, "wb").write(b"\x00\xffnot a record"), "unreadable integrity record"),
], ids=["flipped-bytes", "truncated", "deleted", "edited-config", "garbage-record"])
def test_damaged_checkpoint_is_refused_in_one_line_naming_the_file(run_dir, tmp_path, target, damage, expect):
    """Issue 35's trial list, each through a real lm2-train resume: one line naming the damaged
    file and offering --load-fallback; nothing is trained or saved past the damaged step."""
    source, _ = run_dir
    directory = _copy(source, tmp_path)
    checkpoint = os.path.join(directory, "iter_0000004")
    path = os.path.join(checkpoint, _shard(checkpoint) if target == "shard" else target)
    damage(path)
    line = _one_line_error(_train(*COMMON, "--train-iters", "6", "--save", directory), "lm2-train")
    assert path in line and expect in line and "--load-fallback" in line, line
    assert not os.path.exists(os.path.join(directory, "iter_0000006"))


def test_missing_integrity_record_is_refused_by_every_cli(run_dir, tmp_path):
    """Issue 35: deleting lm2_integrity.json must not turn the checksums off. lm2-train,
    lm2-convert and lm2-eval each refuse the checkpoint in one line naming the file and the
    flag that accepts it; with the flag, lm2-convert exports it (lm2-train's resume with the flag
    is the test above)."""
    from megatron_lm2.training.integrity import INTEGRITY_FILE

    source, _ = run_dir
    directory = _copy(source, tmp_path)
    record = os.path.join(directory, "iter_0000004", INTEGRITY_FILE)
    os.remove(record)
    flag = "--allow-unverified-checkpoint"
    runs = [
        ("megatron_lm2.train", [*COMMON, "--train-iters", "6", "--save", directory], "lm2-train"),
        ("megatron_lm2.convert.cli", ["to-hf", "--load", directory, "--save", str(tmp_path / "hf")], "lm2-convert"),
        ("megatron_lm2.eval.cli", ["inspect", "--megatron", directory, "--text", "hello", "--tokenizer",
                                   "default", "--out", str(tmp_path / "inspect")], "lm2-eval"),
    ]
    for module, args, prog in runs:
        line = _one_line_error(_module(module, *args), prog)
        assert f"{record}: missing" in line and flag in line, (prog, line)
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(os.path.join(directory, "iter_0000006"))

    accepted = _module("megatron_lm2.convert.cli", *runs[1][1], flag)
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert os.path.isfile(tmp_path / "hf" / "config.json")


_LATEST = {
    "binary": bytes(range(256)),
    "non-utf8": b"iter_000\xff\xfe0004\n",
    "empty": b"",
    "blank": b"\n \n",
    "huge": b"iter_0000004" * 200_000,
    "outside": b"../../etc\n",
    "absolute": b"/tmp\n",
    "nul": b"iter_0000004\x00\n",
    "no-such-step": b"iter_0000009\n",
}


@pytest.mark.parametrize("content", list(_LATEST.values()), ids=list(_LATEST))
def test_latest_of_any_content_is_one_line(run_dir, tmp_path, content):
    """Whatever `latest` holds, reading it gives a TrackerError (a UserInputError: one line,
    exit 2) naming the file, never a UnicodeDecodeError or a checkpoint outside the folder."""
    from megatron_lm2.cli_errors import UserInputError
    from megatron_lm2.convert.megatron_io import resolve_checkpoint
    from megatron_lm2.training.checkpoint import latest_checkpoint

    directory = str(tmp_path / "run")
    os.makedirs(os.path.join(directory, "iter_0000004"))
    tracker = os.path.join(directory, "latest")
    with open(tracker, "wb") as handle:
        handle.write(content)
    for read in (latest_checkpoint, resolve_checkpoint):
        with pytest.raises(UserInputError) as error:
            read(directory)
        message = str(error.value)
        assert "\n" not in message and len(message) < 400 and message.startswith(tracker), message
    # The well-formed name is accepted, so the refusals above are about the content.
    with open(tracker, "wb") as handle:
        handle.write(b"iter_0000004\n")
    assert latest_checkpoint(directory) == os.path.join(directory, "iter_0000004")


def test_binary_latest_is_one_line_in_lm2_train(run_dir, tmp_path):
    source, _ = run_dir
    directory = _copy(source, tmp_path)
    with open(os.path.join(directory, "latest"), "wb") as handle:
        handle.write(bytes(range(256)) * 4)
    line = _one_line_error(_train(*COMMON, "--train-iters", "6", "--save", directory), "lm2-train")
    assert f"{os.path.join(directory, 'latest')} holds" in line


def test_metrics_have_each_step_once_after_a_resume(run_dir, tmp_path):
    """The run logged steps 3 and 4 after its step-2 checkpoint; resuming from step 2 drops
    them before logging them again."""
    source, expected = run_dir
    directory = _copy(source, tmp_path)
    shutil.rmtree(os.path.join(directory, "iter_0000004"))
    with open(os.path.join(directory, "latest"), "w") as handle:
        handle.write("iter_0000002\n")
    result = _train(*COMMON, "--train-iters", "4", "--save", directory)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _train_records(os.path.join(directory, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {r["step"]: r["loss"] for r in records} == expected


# ------------------------------------------------------------------------- data shards
def _shards(directory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "shard_00000")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    total = 0
    for _ in range(200):
        doc = rng.integers(2, 500, size=int(rng.integers(20, 60))).tolist() + [1]
        builder.add_document(torch.tensor(doc), [len(doc)])
        total += len(doc)
    builder.finalize(prefix + ".idx")
    with open(os.path.join(directory, "manifest.json"), "w") as handle:
        json.dump(dict(tokenizer=dict(vocab_size=512, eod=1, pad=0, name="fixture")), handle)
    with open(os.path.join(directory, "blend.json"), "w") as handle:
        json.dump(dict(prefixes=["shard_00000"], weights=[1.0]), handle)
    return prefix, total


def test_truncated_bin_is_refused_at_start_up(tmp_path):
    from megatron_lm2.training.shard_check import expected_bin_bytes

    prefix, tokens = _shards(str(tmp_path / "data"))
    assert expected_bin_bytes(prefix + ".idx") == os.path.getsize(prefix + ".bin") == 2 * tokens
    os.truncate(prefix + ".bin", 2 * tokens - 1000)
    result = _train("--flavor", "debug", "--data-path", str(tmp_path / "data"), "--seq-length", "32",
                    "--memory-chunk-size", "32", "--train-iters", "2", "--global-batch-size", "2",
                    "--micro-batch-size", "2", "--lr-warmup-iters", "1")
    line = _one_line_error(result, "lm2-train")
    assert (f"data shard {prefix}.bin: {2 * tokens - 1000} bytes, but its index {prefix}.idx describes "
            f"{2 * tokens}") in line


# ---------------------------------------------------------------------- one-line errors
def test_cli_bad_input_is_one_line_exit_2(run_dir, tmp_path):
    directory = str(tmp_path / "bad-latest")
    os.makedirs(directory)
    with open(os.path.join(directory, "latest"), "w") as handle:
        handle.write("iter_0000009\n")
    cases = [
        ("megatron_lm2.train", ["--mock-data", "--lr", "nan"], "lm2-train", "argument --lr: must be a finite"),
        ("megatron_lm2.train", ["--flavor", "debug", "--data-path", str(tmp_path / "nowhere")], "lm2-train",
         f"--data-path {tmp_path / 'nowhere'}: no such directory"),
        ("megatron_lm2.train", [*COMMON, "--train-iters", "2", "--save", directory], "lm2-train",
         "latest names 'iter_0000009', which is not a checkpoint directory"),
        ("megatron_lm2.convert.cli", ["to-hf", "--load", str(tmp_path / "nowhere"), "--save", str(tmp_path / "x")],
         "lm2-convert", "no such checkpoint directory"),
        ("megatron_lm2.flavors", ["--bogus"], "lm2-flavors", "unrecognized arguments: --bogus"),
        ("megatron_lm2.tokenizer.train", ["--input", str(tmp_path / "none.jsonl"), "--output",
                                          str(tmp_path / "t.model")], "lm2-train-tokenizer", "none.jsonl"),
        ("megatron_lm2.tokenizer.train", ["--vocab-size", "0"], "lm2-train-tokenizer",
         "argument --vocab-size: must be > 0"),
    ]
    for module, args, prog, message in cases:
        line = _one_line_error(_module(module, *args), prog)
        assert message in line, (module, args, line)

    # --debug brings the traceback back.
    debug = _module("megatron_lm2.train", *COMMON, "--train-iters", "2", "--save", directory, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_from_hf_with_a_wrong_hidden_size_is_one_line(run_dir, tmp_path):
    hf = tmp_path / "hf"
    result = _module("megatron_lm2.convert.cli", "to-hf", "--load", run_dir[0], "--save", str(hf),
                     "--tokenizer", "default")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((hf / "config.json").read_text())
    config["hidden_size"] = config["hidden_size"] - 32
    (hf / "config.json").write_text(json.dumps(config))
    line = _one_line_error(_module("megatron_lm2.convert.cli", "from-hf", "--load", str(hf), "--save",
                                   str(tmp_path / "back")), "lm2-convert")
    assert f"hidden_size={config['hidden_size']} do not match the weights" in line


def test_tokenizer_vocabulary_too_large_is_one_line(tmp_path):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text(json.dumps({"text": "hello world"}) + "\n")
    line = _one_line_error(_module("megatron_lm2.tokenizer.train", "--input", str(corpus), "--output",
                                   str(tmp_path / "t.model"), "--vocab-size", "5000"), "lm2-train-tokenizer")
    assert "--vocab-size 5000" in line and "Vocabulary size too high" in line


# ---------------------------------------------------------------------- orphans
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_no_helper_process_outlives_the_trainer(tmp_path, sig):
    """The signal lands during a save, while megatron-core's forked writer processes run (they
    carry the trainer's command line): every descendant seen, the writers, the checkpoint
    writer's Manager and the resource tracker, is gone soon after."""
    import psutil

    directory = str(tmp_path / "ckpt")
    argv = [sys.executable, "-m", "megatron_lm2.train", *COMMON, "--train-iters", "500", "--save", directory,
            "--save-interval", "2"]
    # Output to a file, not a pipe: a surviving writer would hold a pipe open and stall the read.
    log = open(tmp_path / "trainer.log", "w")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env())
    trainer = psutil.Process(process.pid)
    seen, writer_seen = {}, False
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not writer_seen:
        for child in trainer.children(recursive=True):
            try:
                seen[child.pid] = child
                writer_seen |= child.cmdline()[1:4] == argv[1:4]  # a fork of the trainer: a writer
            except psutil.Error:
                pass
        time.sleep(0.002)
    assert writer_seen, ("no save's writer process seen", process.poll(), len(seen))
    time.sleep(0.02)  # into the write: killed at its fork, a writer has nothing to wait for yet
    for child in trainer.children(recursive=True):
        seen[child.pid] = child
    process.send_signal(sig)
    process.wait(timeout=300)
    log.close()
    _, alive = psutil.wait_procs(list(seen.values()), timeout=20)
    described = []
    for child in alive:
        try:
            described.append((child.pid, child.cmdline()))
            child.kill()
        except psutil.Error:
            pass
    assert not described, described


# ------------------------------------------------------------------ WSD and val by chunk
def _lrs(argv):
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    return [r["lr"] for r in Trainer(parse_args(argv)).run()]


def _wsd_lrs(base, k, fraction):
    return _lrs(base + ["--lr-wsd-decay-iters", str(k)]), _lrs(base + ["--lr-wsd-decay-fraction", str(fraction)])


def test_wsd_schedule():
    """Warmup to --lr, stable, then a linear decay to --min-lr over the last k steps."""
    peak, floor, steps, warmup, k = 1e-3, 1e-4, 10, 2, 4
    base = COMMON + ["--train-iters", str(steps), "--lr-warmup-iters", str(warmup), "--lr-decay-style", "WSD",
                     "--num-layers", "1", "--seq-length", "32", "--micro-batch-size", "4", "--log-interval", "100"]
    by_steps, by_fraction = run_distributed(_wsd_lrs, 1, base, k, 0.4)[0]

    def reference(step):  # step = optimizer steps taken
        if step <= warmup:
            return peak * step / warmup
        if step <= steps - k:
            return peak
        return floor + (peak - floor) * (1 - (step - (steps - k)) / k)

    want = [reference(s) for s in range(1, steps + 1)]
    assert np.allclose(by_steps, want, rtol=1e-12, atol=0), (by_steps, want)
    assert by_fraction == by_steps
    assert by_steps[-1] == pytest.approx(floor) and by_steps[warmup] == pytest.approx(peak)


@pytest.mark.parametrize("argv,message", [
    (["--lr-decay-style", "WSD"], "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--lr-wsd-decay-iters", "5"], "need --lr-decay-style WSD"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-steps", "500"], "--lr-wsd-decay-iters 500 is longer"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-fraction", "1.5"], "must be in (0, 1]"),
])
def test_wsd_flag_errors(argv, message, capsys):
    from megatron_lm2.training.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--mock-data", "--train-iters", "100", "--lr-warmup-iters", "10", *argv], world_size=1)
    assert message in capsys.readouterr().err


def _validation_by_chunk(argv):
    """The trainer's validation record, and the same numbers from a plain forward of the model
    over the validation micro-batches (float64 per-token losses grouped by position)."""
    from megatron_lm2.training import data
    from megatron_lm2.training.checkpoint import unwrap
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    train = parse_args(argv)
    trainer = Trainer(train)
    trainer.run()
    with open(train.metrics_file) as handle:
        valid = [json.loads(line) for line in handle if json.loads(line)["kind"] == "valid"]
    model = unwrap(trainer.model_chunks[0])
    model.eval()
    chunk, seq = trainer.model_config.memory_chunk_size, trainer.seq_length
    sums, counts = np.zeros(seq // chunk), np.zeros(seq // chunk)
    batches = data.micro_batches(trainer.valid_set, 0, train.micro_batch_size, 0, 1)
    with torch.no_grad():
        for _ in range(train.eval_iters * trainer.num_microbatches):
            batch = next(batches)
            loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # its own mask
            loss = (loss.double() * batch["loss_mask"].double()).reshape(-1, seq // chunk, chunk)
            sums += loss.sum(dim=(0, 2)).numpy()
            counts += batch["loss_mask"].double().reshape(-1, seq // chunk, chunk).sum(dim=(0, 2)).numpy()
    return valid, (sums / counts).tolist()


@pytest.mark.parametrize("flavor", ["debug", "debug-vanilla"])
def test_validation_loss_by_memory_chunk(tmp_path, flavor):
    metrics_file = str(tmp_path / "metrics.jsonl")
    argv = COMMON + ["--flavor", flavor, "--seq-length", "96", "--memory-chunk-size", "32", "--train-iters", "2",
                     "--eval-interval", "2", "--eval-iters", "2", "--split", "80,20,0",
                     "--metrics-file", metrics_file]
    valid, reference = run_distributed(_validation_by_chunk, 1, argv)[0]
    assert len(valid) == 1 and valid[0]["step"] == 2
    by_chunk = valid[0]["val_loss_by_chunk"]
    assert len(by_chunk) == 3
    assert np.allclose(by_chunk, reference, rtol=1e-6, atol=0), (by_chunk, reference)
    # Equal tokens per chunk: the chunks' mean is the validation loss.
    assert np.mean(by_chunk) == pytest.approx(valid[0]["loss"], rel=1e-6)
    assert all(math.isfinite(x) for x in by_chunk)


# --------------------------------------------------------------------------- full disk
def test_out_of_space_is_found_anywhere_in_the_error_chain():
    import errno

    from megatron_lm2.training.checkpoint import _out_of_space

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("Worker failure: unexpected pos 704 vs 598") from inner
    except RuntimeError as outer:
        assert _out_of_space(outer)
    assert not _out_of_space(RuntimeError("unexpected pos 704 vs 598"))
    assert _out_of_space(RuntimeError("Local process 0 encountered an error: [Errno 28] No space left on device"))


def test_a_full_disk_during_a_save_is_one_line_and_the_rerun_resumes(tmp_path):
    """A real full disk: a 45 MiB tmpfs holds the step-2 checkpoint (~18 MiB) and fills during
    the step-4 save. Needs mount (root with CAP_SYS_ADMIN), else skipped."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=45m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()[:200]}")
    try:
        directory = str(disk / "ckpt")
        args = [*COMMON, "--train-iters", "4", "--save", directory, "--save-interval", "2", "--keep-last", "0"]
        line = _one_line_error(_train(*args), "lm2-train")
        assert f"--save {directory}: no space left on the device during the save of iter_0000004" in line, line
        assert "`latest` still names iter_0000002" in line and "MiB are free" in line
        assert open(os.path.join(directory, "latest")).read().strip() == "iter_0000002"
        assert not [e for e in os.listdir(directory) if e.startswith(".tmp-")]  # the partial save is gone
        subprocess.run(["mount", "-o", "remount,size=100m", str(disk)], check=True)
        result = _train(*args)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"resumed from {os.path.join(directory, 'iter_0000002')} at step 2" in result.stdout
        steps = [r["step"] for r in _train_records(os.path.join(directory, "metrics.jsonl"))]
        assert steps == [1, 2, 3, 4]  # each step once
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
