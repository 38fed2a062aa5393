"""One writer per folder (issue 37 item 1): the lock's rules, then real lm2-train and
lm2-preprocess processes refused by it, and Ctrl-C / an unwritable --save in one line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from megatron_lm2.folder_lock import LOCK_NAME, FolderLock, FolderLockError

from test_faults import COMMON, _env, _one_line_error, _train, _train_records


def _plant(folder, age=0.0, **fields):
    """A lock file as another run would have left it, its heartbeat `age` seconds old."""
    os.makedirs(folder, exist_ok=True)
    record = {"prog": "lm2-train", "host": "node-17", "pid": 4242, "job": "9001", "restart": "0",
              "since": "2026-12-07T10:00:00+00:00", "token": "theirs", **fields}
    path = os.path.join(folder, LOCK_NAME)
    with open(path, "w") as handle:
        json.dump(record, handle)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def no_slurm(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)


def test_a_live_holder_is_refused_by_name_and_keeps_its_lock(tmp_path, no_slurm):
    path = _plant(str(tmp_path), age=10)
    before = open(path).read()
    with pytest.raises(FolderLockError) as error:
        FolderLock(str(tmp_path), "lm2-train", "--save").acquire()
    line = str(error.value)
    for part in ("--save", str(tmp_path), "host node-17", "pid 4242", "slurm job 9001",
                 "since 2026-12-07T10:00:00+00:00", "heartbeat 10 s ago", f"remove {path}"):
        assert part in line, (part, line)
    assert "\n" not in line and open(path).read() == before


@pytest.mark.parametrize("case", ["stale-heartbeat", "dead-pid-here", "requeued-job"])
def test_a_dead_holders_lock_is_taken_over(tmp_path, monkeypatch, no_slurm, case):
    folder = str(tmp_path)
    if case == "stale-heartbeat":
        _plant(folder, age=400)
        expect = "heartbeat stopped 400 s ago"
    elif case == "dead-pid-here":
        pid = _dead_pid()
        _plant(folder, age=1, host=socket.gethostname(), pid=pid)
        expect = f"pid {pid} on this host is gone"
    else:
        _plant(folder, age=1, job="555", restart="0")
        monkeypatch.setenv("SLURM_JOB_ID", "555")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        expect = "an earlier run of slurm job 555 (requeued)"
    lock = FolderLock(folder, "lm2-train", "--save").acquire()
    try:
        assert expect in lock.took_over, lock.took_over
        record = json.load(open(os.path.join(folder, LOCK_NAME)))
        assert record["token"] == lock.token and record["pid"] == os.getpid() and lock.held()
        assert not [n for n in os.listdir(folder) if n.startswith(LOCK_NAME + ".")]  # nothing set aside
    finally:
        lock.release()
    assert not os.path.exists(os.path.join(folder, LOCK_NAME))


def test_the_same_job_in_the_same_incarnation_is_refused(tmp_path, monkeypatch):
    """Two job steps of one slurm run writing one folder are two writers."""
    _plant(str(tmp_path), age=1, job="555", restart="0")
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(FolderLockError, match="slurm job 555"):
        FolderLock(str(tmp_path), "lm2-train", "--save").acquire()


def test_heartbeat_keeps_the_lock_fresh_and_a_takeover_is_noticed(tmp_path, no_slurm):
    lock = FolderLock(str(tmp_path), "lm2-train", "--save", heartbeat=0.05).acquire()
    path = os.path.join(str(tmp_path), LOCK_NAME)
    os.utime(path, (time.time() - 1000,) * 2)
    time.sleep(0.5)
    assert time.time() - os.stat(path).st_mtime < 5
    lock.check_held()
    _plant(str(tmp_path), age=0)  # another run took it over while ours looked dead
    with pytest.raises(FolderLockError, match="now held by lm2-train on host node-17"):
        lock.check_held()
    lock.release()
    assert json.load(open(path))["token"] == "theirs"  # release leaves the new holder's file


_RACE = """
import sys, time
from megatron_lm2.folder_lock import FolderLock, FolderLockError
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    FolderLock(sys.argv[1], "lm2-train", "--save").acquire()
    print("took", flush=True)
    time.sleep(2)
except FolderLockError:
    print("refused", flush=True)
"""


def test_racing_takers_of_a_stale_lock_leave_one_holder(tmp_path, no_slurm):
    _plant(str(tmp_path), age=1000)
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                              text=True, env=_env()) for _ in range(6)]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outcomes == ["refused"] * 5 + ["took"], outcomes


@pytest.mark.parametrize("target,message", [
    ("a-file", "exists and is not a folder"),
    ("/proc/lm2-run", "cannot create the folder"),
])
def test_unwritable_folder_is_one_line(tmp_path, target, message):
    folder = str(tmp_path / target) if target == "a-file" else target
    if target == "a-file":
        open(folder, "w").write("x")
    with pytest.raises(FolderLockError, match=message):
        FolderLock(folder, "lm2-train", "--save").acquire()


# --------------------------------------------------------------------------- real processes
def _start(directory, *extra, log_path):
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "megatron_lm2.train", *COMMON, "--save", directory, *extra],
                               stdout=log, stderr=subprocess.STDOUT, env=_env())
    return process, log


def _wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_second_trainer_on_one_save_is_refused_and_the_first_is_untouched(tmp_path):
    directory = str(tmp_path / "ckpt")
    first, log = _start(directory, "--train-iters", "100000", "--save-interval", "3", "--seed", "1", "--keep-last", "0",
                        log_path=tmp_path / "first.log")
    try:
        assert _wait_for(lambda: os.path.isdir(os.path.join(directory, "iter_0000003"))), open(tmp_path / "first.log").read()
        def settled():  # the first run's own saves come and go as .tmp names
            return {e for e in os.listdir(directory) if ".tmp" not in e}
        listing = settled()
        line = _one_line_error(_train(*COMMON, "--train-iters", "4", "--save", directory, "--seed", "2",
                                      "--save-interval", "1"), "lm2-train")
        assert f"--save {directory} is in use by lm2-train" in line and f"pid {first.pid}" in line, line
        assert first.poll() is None
        assert listing <= settled()
        first.send_signal(signal.SIGINT)  # Ctrl-C: saves at the next step, then exits
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    output = open(tmp_path / "first.log").read()
    assert "Traceback" not in output and "interrupted: saving after this step" in output, output[-3000:]
    steps = [r["step"] for r in _train_records(os.path.join(directory, "metrics.jsonl"))]
    assert steps == list(range(1, len(steps) + 1))  # one run's steps, each once
    latest = open(os.path.join(directory, "latest")).read().strip()
    assert latest == f"iter_{steps[-1]:07d}"  # the Ctrl-C saved the last step
    assert not os.path.exists(os.path.join(directory, LOCK_NAME))  # given back at exit


_TWICE = """
import os, signal, time
from megatron_lm2.training.signals import ExitSignal
exit_signal = ExitSignal()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
assert exit_signal.received == "SIGINT"
print("first one only set the flag", flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("still running", flush=True)
"""


def test_second_ctrl_c_exits_at_once_in_one_line(tmp_path):
    """The trainer's handler: the first Ctrl-C asks for save-then-exit, the second exits at once
    (the real trainer's first Ctrl-C is the test above)."""
    result = subprocess.run([sys.executable, "-c", _TWICE], capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == 130, (result.stdout, result.stderr)
    assert result.stdout.split() == "first one only set the flag".split()
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 2, lines
    assert lines[0].startswith("lm2-train: interrupted: saving") and "interrupted again: exiting now" in lines[1]


def test_a_killed_trainers_lock_does_not_lock_the_next_run_out(tmp_path):
    directory = str(tmp_path / "ckpt")
    process, log = _start(directory, "--train-iters", "100000", "--save-interval", "1000",
                          log_path=tmp_path / "run.log")
    try:
        assert _wait_for(lambda: os.path.exists(os.path.join(directory, "metrics.jsonl"))
                         and os.path.getsize(os.path.join(directory, "metrics.jsonl")) > 0)
        process.kill()
        process.wait(timeout=60)
    finally:
        log.close()
    assert os.path.exists(os.path.join(directory, LOCK_NAME))
    result = _train(*COMMON, "--train-iters", "3", "--save", directory)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"pid {process.pid} on this host is gone" in result.stdout + result.stderr


def test_unwritable_save_is_refused_before_the_model_is_built(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    line = _one_line_error(_train(*COMMON, "--train-iters", "2", "--save", str(target)), "lm2-train")
    assert f"--save {target}: exists and is not a folder" in line


def test_second_preprocess_on_one_output_is_refused(tmp_path):
    out = str(tmp_path / "shards")
    _plant(out, age=0, prog="lm2-preprocess", host=socket.gethostname(), pid=os.getpid(), job=None)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    result = subprocess.run([sys.executable, "-m", "megatron_lm2.preprocess.cli", "--input", str(src), "--output",
                             out, "--workers", "0", "--no-progress"], capture_output=True, text=True, env=_env())
    line = _one_line_error(result, "lm2-preprocess")
    assert f"--output {out} is in use by lm2-preprocess" in line and f"pid {os.getpid()}" in line, line
    assert os.listdir(out) == [LOCK_NAME]  # nothing written beside the holder's lock
