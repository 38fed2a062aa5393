"""The fault matrix: users' ways of breaking a run, re-run as real processes, one table.

    python benchmarks/faults.py                 # every trial (~3-5 min on a 2-core box)
    python benchmarks/faults.py --quick         # the trials that need no trained run first
    python benchmarks/faults.py --out faults.md # also write the table

Each trial is a real `lm2-train` / `lm2-convert` / `lm2-eval` / `lm2-preprocess` process on the
debug flavor, under a timeout (a hang is a failed trial). Bad input must end in exit 2 with one
stderr line `prog: error: ...` naming the file or flag, no traceback; the controls (good input
next to a fault) must exit 0. Prints: trial, exit code, the line printed, verdict. Exit code 1
when any trial fails. tests/test_fault_matrix.py runs `--quick` in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, List, Optional

TIMEOUT = 180
TRAIN = ["--flavor", "debug", "--mock-data", "--num-layers", "2", "--seq-length", "64", "--memory-chunk-size", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-4",
         "--lr-warmup-iters", "1", "--log-interval", "1"]
DATA = [a for a in TRAIN if a != "--mock-data"]


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "LM2_DEBUG", "SLURM_JOB_ID"):
        env.pop(key, None)
    return env


PROGS = {"megatron_lm2.train": "lm2-train", "megatron_lm2.convert.cli": "lm2-convert",
         "megatron_lm2.eval.cli": "lm2-eval", "megatron_lm2.preprocess.cli": "lm2-preprocess"}


@dataclass
class Outcome:
    code: Optional[int]
    line: str
    ok: bool
    why: str = ""


def run(module: str, args: List[str], expect: Optional[str], timeout: float = TIMEOUT) -> Outcome:
    """`expect` None: a control that must succeed; else a substring of the one error line."""
    try:
        result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                                timeout=timeout, env=_env())
    except subprocess.TimeoutExpired:
        return Outcome(None, "", False, f"hang: no exit in {timeout:.0f} s")
    return judge(PROGS[module], result.returncode, result.stdout, result.stderr, expect)


def judge(prog: str, code: int, stdout: str, stderr: str, expect: Optional[str]) -> Outcome:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if "Traceback" in stdout + stderr:
        return Outcome(code, last, False, "traceback")
    if expect is None:
        return Outcome(code, last or "(ok)", code == 0, "" if code == 0 else "a control failed")
    if code == 0:
        return Outcome(code, last, False, "exit 0 on bad input")
    if code != 2 or len(lines) != 1 or not last.startswith(f"{prog}: error: "):
        return Outcome(code, last, False, f"not one line with exit 2 ({len(lines)} lines)")
    if expect not in last:
        return Outcome(code, last, False, f"the line lacks {expect!r}")
    return Outcome(code, last, True)


# ------------------------------------------------------------------------------ fixtures
class Lab:
    """A scratch folder with the things trials damage copies of."""

    def __init__(self, root: str):
        self.root = root
        self._run: Optional[str] = None
        self._shards: Optional[str] = None
        self.count = 0
        self._lock = threading.Lock()

    def path(self, name: str) -> str:
        with self._lock:  # trials run side by side
            self.count += 1
            return os.path.join(self.root, f"{self.count:02d}-{name}")

    def base_run(self) -> str:
        """4 steps, checkpoints at 2 and 4, all kept (built once)."""
        if self._run is None:
            directory = os.path.join(self.root, "base-run")
            outcome = run("megatron_lm2.train", [*TRAIN, "--train-iters", "4", "--save", directory, "--save-interval",
                                                 "2", "--keep-last", "0"], None)
            if not outcome.ok:
                raise RuntimeError(f"the base run failed: {outcome}")
            self._run = directory
        return self._run

    def run_copy(self, name: str) -> str:
        target = self.path(name)
        shutil.copytree(self.base_run(), target)
        return target

    def shards(self) -> str:
        """16 documents with the embedded tokenizer (built once)."""
        if self._shards is None:
            src = os.path.join(self.root, "corpus.jsonl")
            with open(src, "w") as handle:
                for i in range(16):
                    handle.write(json.dumps({"text": " ".join(f"story {i} word {j}" for j in range(60))}) + "\n")
            out = os.path.join(self.root, "shards")
            outcome = run("megatron_lm2.preprocess.cli", ["--input", src, "--output", out, "--workers", "0",
                                                          "--no-progress"], None)
            if not outcome.ok:
                raise RuntimeError(f"preprocessing failed: {outcome}")
            self._shards = out
        return self._shards

    def shard_copy(self, name: str) -> str:
        target = self.path(name)
        shutil.copytree(self.shards(), target)
        return target


def _first_shard(directory: str) -> str:
    checkpoint = os.path.join(directory, "iter_0000004")
    return os.path.join(checkpoint, sorted(f for f in os.listdir(checkpoint) if f.endswith(".distcp"))[0])


def _prefix(shards: str) -> str:
    record = json.load(open(os.path.join(shards, "manifest.json")))["shards"][0]
    return os.path.join(shards, record["prefix"])


def _flip(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _resume(directory: str, expect: Optional[str], *extra: str) -> Outcome:
    return run("megatron_lm2.train", [*TRAIN, "--train-iters", "6", "--save", directory, *extra], expect)


def _bare_shard(directory: str, ids_of_docs, dtype="uint16") -> str:
    from megatron_lm2.preprocess.shards import write_shard

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "bare")
    write_shard(prefix, ids_of_docs, dtype)
    return prefix


def _shift_lengths(prefix: str, change: Callable) -> None:
    import numpy as np

    with open(prefix + ".idx", "rb") as handle:
        head = handle.read(34)
    count = int.from_bytes(head[18:26], "little")
    with open(prefix + ".idx", "r+b") as handle:
        handle.seek(34)
        lengths = np.frombuffer(handle.read(4 * count), dtype=np.int32).copy()
        change(lengths)
        handle.seek(34)
        handle.write(lengths.tobytes())


# -------------------------------------------------------------------------------- trials
def t_checkpoint_damage(kind: str):
    def trial(lab: Lab) -> Outcome:
        directory = lab.run_copy(kind)
        checkpoint = os.path.join(directory, "iter_0000004")
        if kind == "flipped-bytes":
            target = _first_shard(directory)
            _flip(target)
            return _resume(directory, "sha256 does not match")
        if kind == "truncated-file":
            target = _first_shard(directory)
            with open(target, "r+b") as handle:
                handle.truncate(os.path.getsize(target) - 9)
            return _resume(directory, "bytes, the checkpoint recorded")
        if kind == "deleted-file":
            os.remove(_first_shard(directory))
            return _resume(directory, "missing")
        if kind == "edited-config":
            path = os.path.join(checkpoint, "lm2_config.json")
            config = json.load(open(path))
            config["edited"] = True  # what a hand edit does: the file no longer matches its record
            json.dump(config, open(path, "w"))
            return _resume(directory, "lm2_config.json")
        if kind == "garbage-record":
            open(os.path.join(checkpoint, "lm2_integrity.json"), "wb").write(os.urandom(300))
            return _resume(directory, "unreadable integrity record")
        if kind == "record-deleted-then-flipped":
            os.remove(os.path.join(checkpoint, "lm2_integrity.json"))
            _flip(_first_shard(directory))
            return _resume(directory, "--allow-unverified-checkpoint")
        raise ValueError(kind)
    trial.__name__ = f"checkpoint: {kind}"
    return trial


def t_latest(kind: str):
    contents = {"no-such-checkpoint": b"iter_0000009\n", "binary": bytes(range(256)) * 4, "empty": b"",
                "huge": b"iter_0000004" * 100_000, "path-elsewhere": b"/etc/passwd\n", "latin-1": "itér_4".encode("latin-1")}

    def trial(lab: Lab) -> Outcome:
        directory = lab.run_copy(f"latest-{kind}")
        open(os.path.join(directory, "latest"), "wb").write(contents[kind])
        return _resume(directory, os.path.join(directory, "latest"))
    trial.__name__ = f"latest: {kind}"
    return trial


def t_unverified_control(lab: Lab) -> Outcome:
    directory = lab.run_copy("unverified-control")
    os.remove(os.path.join(directory, "iter_0000004", "lm2_integrity.json"))
    return _resume(directory, None, "--allow-unverified-checkpoint")


def t_convert_flipped(lab: Lab) -> Outcome:
    directory = lab.run_copy("convert-flipped")
    _flip(_first_shard(directory))
    return run("megatron_lm2.convert.cli", ["to-hf", "--load", directory, "--save", lab.path("hf")],
               "sha256 does not match")


def t_eval_no_record(lab: Lab) -> Outcome:
    directory = lab.run_copy("eval-no-record")
    os.remove(os.path.join(directory, "iter_0000004", "lm2_integrity.json"))
    return run("megatron_lm2.eval.cli", ["inspect", "--megatron", directory, "--text", "hello", "--tokenizer", "default",
                                         "--out", lab.path("inspect")], "--allow-unverified-checkpoint")


def t_flag(name: str, args: List[str], expect: str):
    def trial(lab: Lab) -> Outcome:
        return run("megatron_lm2.train", [a.replace("{tmp}", lab.path("x")) for a in args], expect)
    trial.__name__ = f"flag: {name}"
    trial.quick = True
    return trial


def t_save_not_a_folder(lab: Lab) -> Outcome:
    target = lab.path("a-file")
    open(target, "w").write("x")
    return run("megatron_lm2.train", [*TRAIN, "--train-iters", "2", "--save", target], "exists and is not a folder")


t_save_not_a_folder.quick = True


def t_diverged(args: List[str]):
    def trial(lab: Lab) -> Outcome:
        return run("megatron_lm2.train", [*TRAIN, "--train-iters", "6", "--save", lab.path("div"), "--save-interval",
                                          "1", *args], "diverged")
    trial.__name__ = "diverged but finite: " + " ".join(args)
    return trial


def t_tiny_corpus(lab: Lab) -> Outcome:
    src = lab.path("tiny.jsonl")
    open(src, "w").write(json.dumps({"text": "seven tokens or so"}) + "\n")
    out = lab.path("tiny-shards")
    made = run("megatron_lm2.preprocess.cli", ["--input", src, "--output", out, "--workers", "0", "--no-progress"], None)
    if not made.ok:
        return made
    return run("megatron_lm2.train", [*DATA, "--data-path", out, "--train-iters", "2"], "less than one sequence")


def t_empty_validation(lab: Lab) -> Outcome:
    return run("megatron_lm2.train", [*DATA, "--data-path", lab.shards(), "--train-iters", "4", "--eval-interval",
                                      "2", "--eval-iters", "1"], "the validation split of")


def t_small_corpus_control(lab: Lab) -> Outcome:
    return run("megatron_lm2.train", [*DATA, "--data-path", lab.shards(), "--train-iters", "2"], None)


def t_blend_weight(weight: str, source: str):
    def trial(lab: Lab) -> Outcome:
        prefix = _prefix(lab.shards())
        if source == "data-path":
            args = ["--data-path", weight, prefix, "1", prefix, "--tokenizer", "default"]
        else:
            folder = lab.path("blend")
            os.makedirs(folder)
            shutil.copy(os.path.join(lab.shards(), "manifest.json"), folder)
            json.dump({"prefixes": [prefix], "weights": [float(weight)]}, open(os.path.join(folder, "blend.json"), "w"))
            args = ["--blend-file", os.path.join(folder, "blend.json")]
        return run("megatron_lm2.train", [*DATA, *args, "--train-iters", "2"], "finite and positive")
    trial.__name__ = f"blend weight {weight} in {source}"
    return trial


def t_forged_ids(lab: Lab) -> Outcome:
    docs = [[(7 * i + j) % 2000 + 1 for j in range(120)] for i in range(30)]
    docs[11][3] = 3000
    prefix = _bare_shard(lab.path("forged"), docs)
    return run("megatron_lm2.train", [*DATA, "--data-path", prefix, "--tokenizer", "default", "--train-iters", "2"],
               "outside the model's vocabulary")


def t_idx_rewritten(lab: Lab) -> Outcome:
    shards = lab.shard_copy("idx-rewritten")

    def shift(lengths):
        lengths[0] += 3
        lengths[1] -= 3
    _shift_lengths(_prefix(shards), shift)
    return run("megatron_lm2.train", [*DATA, "--data-path", shards, "--train-iters", "2"], "sha256 differs")


def t_idx_doubled(lab: Lab) -> Outcome:
    prefix = _bare_shard(lab.path("doubled"), [[(i + j) % 2000 + 1 for j in range(99)] for i in range(20)])

    def double(lengths):
        lengths[:-1] *= 2
    _shift_lengths(prefix, double)
    return run("megatron_lm2.train", [*DATA, "--data-path", prefix, "--tokenizer", "default", "--train-iters", "2"],
               "lengths add up to")


def t_bin_truncated(lab: Lab) -> Outcome:
    shards = lab.shard_copy("bin-truncated")
    path = _prefix(shards) + ".bin"
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 10)
    return run("megatron_lm2.train", [*DATA, "--data-path", shards, "--train-iters", "2"], "truncated")


def t_second_trainer(lab: Lab) -> Outcome:
    directory = lab.path("shared-save")
    log = open(lab.path("first.log"), "w")
    first = subprocess.Popen([sys.executable, "-m", "megatron_lm2.train", *TRAIN, "--train-iters", "100000",
                              "--save", directory, "--save-interval", "1000"], stdout=log, stderr=subprocess.STDOUT,
                             env=_env())
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and not os.path.exists(os.path.join(directory, "metrics.jsonl")):
            time.sleep(0.1)
        outcome = run("megatron_lm2.train", [*TRAIN, "--train-iters", "4", "--save", directory, "--seed", "2"],
                      f"pid {first.pid}")
        if outcome.ok and first.poll() is not None:
            outcome = Outcome(outcome.code, outcome.line, False, "the first run did not survive")
        return outcome
    finally:
        first.kill()
        first.wait()
        log.close()


def _preprocess_one_document(lab: Lab, output: str, expect: str) -> Outcome:
    src = lab.path("in.jsonl")
    open(src, "w").write(json.dumps({"text": "a document"}) + "\n")
    return run("megatron_lm2.preprocess.cli", ["--input", src, "--output", output, "--workers", "0", "--no-progress"],
               expect)


def t_second_preprocess(lab: Lab) -> Outcome:
    out = lab.path("held-output")
    os.makedirs(out)
    json.dump({"prog": "lm2-preprocess", "host": socket.gethostname(), "pid": os.getpid(), "since": "now",
               "token": "t"}, open(os.path.join(out, "lm2.lock"), "w"))
    return _preprocess_one_document(lab, out, "is in use by lm2-preprocess")


t_second_preprocess.quick = True


def t_preprocess_output_a_file(lab: Lab) -> Outcome:
    target = lab.path("out-file")
    open(target, "w").write("x")
    return _preprocess_one_document(lab, target, "--output")


t_preprocess_output_a_file.quick = True


def t_ctrl_c(lab: Lab) -> Outcome:
    """Ctrl-C: save after the step, exit 0, no traceback, the checkpoint is the last step."""
    directory = lab.path("ctrl-c")
    process = subprocess.Popen([sys.executable, "-m", "megatron_lm2.train", *TRAIN, "--train-iters", "100000",
                                "--save", directory, "--save-interval", "1000"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + TIMEOUT
    metrics = os.path.join(directory, "metrics.jsonl")
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        return Outcome(None, "", False, "hang after Ctrl-C")
    outcome = judge("lm2-train", process.returncode, stdout, stderr, None)
    saved = os.path.exists(os.path.join(directory, "latest"))
    return Outcome(outcome.code, outcome.line, outcome.ok and saved, "" if saved else "nothing saved")


def t_kill_mid_save(lab: Lab) -> Outcome:
    """kill -9 while a save's writer runs: no process of ours is left."""
    import psutil

    directory = lab.path("kill-9")
    argv = [sys.executable, "-m", "megatron_lm2.train", *TRAIN, "--train-iters", "500", "--save", directory,
            "--save-interval", "2"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    trainer = psutil.Process(process.pid)
    seen, writer = {}, False
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and process.poll() is None and not writer:
        for child in trainer.children(recursive=True):
            try:
                seen[child.pid] = child
                writer |= child.cmdline()[1:4] == argv[1:4]
            except psutil.Error:
                pass
        time.sleep(0.002)
    time.sleep(0.02)
    process.kill()
    process.wait()
    _, alive = psutil.wait_procs(list(seen.values()), timeout=20)
    for child in alive:
        child.kill()
    return Outcome(-9, f"{len(seen)} helper processes seen, {len(alive)} alive after", writer and not alive,
                   "" if writer else "no writer seen")


def t_full_disk(lab: Lab) -> Outcome:
    disk = lab.path("disk")
    os.makedirs(disk)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=45m", "tmpfs", disk], capture_output=True).returncode:
        return Outcome(None, "(skipped: cannot mount a tmpfs here)", True, "skipped")
    try:
        return run("megatron_lm2.train", [*TRAIN, "--train-iters", "4", "--save", os.path.join(disk, "c"),
                                          "--save-interval", "2", "--keep-last", "0"], "no space left on the device")
    finally:
        subprocess.run(["umount", disk], capture_output=True)


TRIALS = [
    *(t_checkpoint_damage(k) for k in ("flipped-bytes", "truncated-file", "deleted-file", "edited-config",
                                       "garbage-record", "record-deleted-then-flipped")),
    *(t_latest(k) for k in ("no-such-checkpoint", "binary", "empty", "huge", "path-elsewhere", "latin-1")),
    t_unverified_control, t_convert_flipped, t_eval_no_record,
    t_flag("--lr nan", [*TRAIN, "--lr", "nan"], "argument --lr: must be a finite"),
    t_flag("--weight-decay inf", [*TRAIN, "--weight-decay", "inf"], "--weight-decay"),
    t_flag("--split 1,2", [*TRAIN, "--split", "1,2"], "--split"),
    t_flag("--data-path missing", [*DATA, "--data-path", "{tmp}"], "no such directory"),
    t_flag("unknown flag", [*TRAIN, "--bogus"], "unrecognized arguments: --bogus"),
    t_flag("--eval-interval without a validation share",
           [*TRAIN, "--eval-interval", "2", "--split", "100,0,0"], "--eval-interval"),
    t_flag("--save under /proc", [*TRAIN, "--train-iters", "2", "--save", "/proc/lm2-fault-matrix"],
           "cannot create the folder"),
    t_save_not_a_folder,
    t_diverged(["--lr", "1e6"]), t_diverged(["--weight-decay", "1e30"]),
    t_tiny_corpus, t_empty_validation, t_small_corpus_control,
    t_blend_weight("-1", "data-path"), t_blend_weight("0", "blend.json"), t_blend_weight("nan", "blend.json"),
    t_forged_ids, t_idx_rewritten, t_idx_doubled, t_bin_truncated,
    t_second_trainer, t_second_preprocess, t_preprocess_output_a_file,
    t_ctrl_c, t_kill_mid_save, t_full_disk,
]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the trials that need no trained run or corpus")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    parser.add_argument("--jobs", type=int, default=2, help="trials run side by side (default 2)")
    args = parser.parse_args(argv)
    trials = [t for t in TRIALS if getattr(t, "quick", False)] if args.quick else TRIALS
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lm2-faults-") as root:
        lab = Lab(root)
        if not args.quick:
            lab.base_run()
            lab.shards()

        def one(trial):
            began = time.perf_counter()
            try:
                outcome = trial(lab)
            except Exception as error:  # the harness's own failure is a failed trial, not a crash
                outcome = Outcome(None, repr(error)[:200], False, "harness error")
            return trial.__name__, outcome, time.perf_counter() - began

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            rows = [(name, Outcome(o.code, o.line.replace(root, "$TMP"), o.ok, o.why), took)
                    for name, o, took in pool.map(one, trials)]
    seconds = time.perf_counter() - started
    table = ["| trial | exit | line printed | verdict | s |", "|---|---|---|---|---|"]
    for name, outcome, took in rows:
        verdict = "ok" if outcome.ok else f"FAIL: {outcome.why}"
        if outcome.ok and outcome.why == "skipped":
            verdict = "skipped"
        line = outcome.line.replace("|", "\\|")
        table.append(f"| {name} | {outcome.code} | {line[:160]} | {verdict} | {took:.1f} |")
    failed = [name for name, outcome, _ in rows if not outcome.ok]
    summary = (f"{len(rows)} trials in {seconds:.0f} s, {len(failed)} failed; tracebacks "
               f"{sum(o.why == 'traceback' for _, o, _ in rows)}, hangs {sum(o.why.startswith('hang') for _, o, _ in rows)}, "
               f"exit 0 on bad input {sum(o.why == 'exit 0 on bad input' for _, o, _ in rows)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    header = (f"Fault matrix, {time.strftime('%Y-%m-%d')}, commit {commit}, {os.cpu_count()} CPU cores "
              f"(load {os.getloadavg()[0]:.1f}), {args.jobs} trials side by side. `$TMP` is the scratch folder.")
    print(header)
    print("\n".join(table))
    print(summary)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("# " + header + "\n\n" + "\n".join(table) + "\n\n" + summary + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
