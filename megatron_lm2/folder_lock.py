"""One writer per folder: the lock `lm2-train` takes on `--save` and `lm2-preprocess` on `--output`.

Clusters keep checkpoints on Lustre or NFS, seen by many nodes, where `flock`/`fcntl` locks may
not be honoured across nodes. Exclusive create (`O_CREAT | O_EXCL`) is atomic there, so the lock
is a file made that way, holding who took it (host, pid, slurm job, since when), and kept alive
by a heartbeat thread that touches it. A lock is taken over, never waited for, when:

* its heartbeat is older than `stale_after` seconds (the holder died without removing it: a node
  lost, kill -9 before the heartbeat stopped is the same),
* its holder is a process on this host that no longer exists (no need to wait out the heartbeat),
* it is this slurm job's, from an earlier incarnation (`scontrol requeue`: same SLURM_JOB_ID,
  another SLURM_RESTART_COUNT), or this very process's.

Anything else is refused in one line naming the holder; the holder's files are left as they were.
A takeover renames the old file aside first (one renamer wins), so two runs that both find a
stale lock do not both take it. The holder checks, before each save, that the file still names
it (`check_held`): a run whose lock was taken over while its heartbeat stalled stops instead of
writing into a folder it no longer owns.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable, Optional

from megatron_lm2.cli_errors import UserInputError

LOCK_NAME = "lm2.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


class FolderLockError(UserInputError):
    """The folder is another run's, or cannot be written."""


def _job() -> dict:
    return {"job": os.environ.get("SLURM_JOB_ID"), "restart": os.environ.get("SLURM_RESTART_COUNT", "0")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class FolderLock:
    """`FolderLock(folder, prog).acquire()` ... `release()`; also a context manager."""

    def __init__(self, folder: str, prog: str, flag: str, heartbeat: float = HEARTBEAT_SECONDS,
                 stale_after: float = STALE_SECONDS):
        self.folder, self.prog, self.flag = folder, prog, flag
        self.path = os.path.join(folder, LOCK_NAME)
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.took_over: Optional[str] = None  # why an earlier holder's lock was taken, if it was

    # -------------------------------------------------------------------- the record
    def _record(self) -> dict:
        return {"prog": self.prog, "host": socket.gethostname(), "pid": os.getpid(), **_job(),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": self.token}

    def _read(self, path: Optional[str] = None) -> Optional[dict]:
        try:
            with open(path or self.path, "rb") as handle:
                record = json.loads(handle.read(4096).decode("utf-8", "replace"))
            return record if isinstance(record, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written or garbage: judged by its age alone

    def _age(self) -> Optional[float]:
        try:
            return max(0.0, time.time() - os.stat(self.path).st_mtime)
        except FileNotFoundError:
            return None

    def describe(self, record: dict, age: Optional[float]) -> str:
        job = f", slurm job {record['job']}" if record.get("job") else ""
        beat = f", heartbeat {age:.0f} s ago" if age is not None else ""
        return (f"{record.get('prog', '?')} on host {record.get('host', '?')}, pid {record.get('pid', '?')}{job}, "
                f"since {record.get('since', '?')}{beat}")

    def _why_stale(self, record: dict, age: Optional[float]) -> Optional[str]:
        """Why this lock may be taken over, or None when its holder may still be writing."""
        here = record.get("host") == socket.gethostname()
        if here and record.get("pid") == os.getpid():
            return "this process's own"
        job = _job()
        if job["job"] and record.get("job") == job["job"] and str(record.get("restart")) != job["restart"]:
            return f"an earlier run of slurm job {job['job']} (requeued)"
        if here and isinstance(record.get("pid"), int) and not _pid_alive(record["pid"]):
            return f"pid {record['pid']} on this host is gone"
        if age is not None and age > self.stale_after:
            return f"its heartbeat stopped {age:.0f} s ago (> {self.stale_after:.0f} s)"
        return None

    # -------------------------------------------------------------------- take, keep, give
    def acquire(self) -> "FolderLock":
        if os.path.lexists(self.folder) and not os.path.isdir(self.folder):
            raise FolderLockError(f"{self.flag} {self.folder}: exists and is not a folder")
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as error:
            raise FolderLockError(f"{self.flag} {self.folder}: cannot create the folder "
                                  f"({error.strerror or error})") from None
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise FolderLockError(f"{self.flag} {self.folder}: not writable by this user")
        for _ in range(3):  # a stale lock is moved aside, then the create is tried again
            if self._create():
                self._start_heartbeat()
                return self
            record, age = self._read(), self._age()
            if record is None:
                continue  # released between our create and our read
            why = self._why_stale(record, age)
            if why is None:
                raise FolderLockError(
                    f"{self.flag} {self.folder} is in use by {self.describe(record, age)} ({self.path}); "
                    f"a second writer would mix its files with that run's. Use another folder, or if that "
                    f"run is gone, remove {self.path} (or wait: a lock whose heartbeat is "
                    f"{self.stale_after:.0f} s old is taken over)")
            aside = f"{self.path}.stale-{self.token}"
            try:
                os.rename(self.path, aside)  # one of several takers wins this
            except FileNotFoundError:
                continue
            moved = self._read(aside)
            if moved is not None and moved.get("token") != record.get("token"):
                # Another taker replaced the stale lock between our read and our rename: put its
                # fresh lock back (nobody creates while the path exists) and look again.
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                os.unlink(aside)
                continue
            os.unlink(aside)
            self.took_over = f"{self.describe(record, age)}: {why}"
        raise FolderLockError(f"{self.path}: could not take the lock (it keeps changing hands)")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as error:  # read-only filesystem, a pseudo-filesystem, no space
            raise FolderLockError(f"{self.flag} {self.folder}: cannot write there "
                                  f"({error.strerror or error})") from None
        try:
            os.write(fd, (json.dumps(self._record()) + "\n").encode())  # no fsync: the create is the lock
        except OSError as error:
            os.close(fd)
            os.unlink(self.path)
            raise FolderLockError(f"{self.flag} {self.folder}: cannot write there "
                                  f"({error.strerror or error})") from None
        os.close(fd)
        return True

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat):
                try:
                    if (self._read() or {}).get("token") == self.token:
                        os.utime(self.path)
                except OSError:
                    pass  # a filesystem hiccup: the next beat tries again

        self._thread = threading.Thread(target=beat, name="lm2-folder-lock", daemon=True)
        self._thread.start()

    def held(self) -> bool:
        return (self._read() or {}).get("token") == self.token

    def check_held(self) -> None:
        """Before writing: stop if another run took the lock over."""
        if not self.held():
            record = self._read()
            holder = self.describe(record, self._age()) if record else "nobody (the file is gone)"
            raise FolderLockError(f"{self.path}: this run's lock on {self.folder} is now held by {holder}; "
                                  f"stopping without writing there")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            if self.held():
                os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_on_rank0(folder: str, prog: str, flag: str, rank: int, share: Callable[[object], object],
                  warn: Callable[[str], None]) -> Optional[FolderLock]:
    """Rank 0 takes the lock; `share(x)` returns rank 0's x on every rank (a broadcast, or the
    identity in a world of one), so a refused run ends on all ranks with the same line and no
    rank waits in a collective for one that left. The lock on rank 0, None elsewhere."""
    lock, problem = None, None
    if rank == 0:
        try:
            lock = FolderLock(folder, prog, flag).acquire()
            if lock.took_over:
                warn(f"{flag} {folder}: took over the lock of {lock.took_over}")
        except FolderLockError as error:
            problem = str(error)
    problem = share(problem)
    if problem is not None:
        raise FolderLockError(problem)
    return lock
