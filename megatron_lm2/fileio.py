"""Atomic file writes: the new file appears whole, or the old one stays (standard library only,
so that torch-free entry points such as lm2-preprocess can use it).

Every writer here writes a temporary file in the target's directory (same file system, so the
final ``os.replace`` is an atomic rename), optionally fsyncs it, renames it over the target,
optionally fsyncs the directory (which makes the rename itself durable), and removes the
temporary file if anything fails on the way. A reader never sees half a file; a killed writer
leaves the old file (and at most its temporary file) behind.

Options shared by every writer (keyword-only):

``fsync``
    flush and fsync the file's data before the rename (default True: a checkpoint record or a
    manifest must survive a power cut; pass False for files that are cheap to regenerate).
``sync_dir``
    fsync the directory after the rename (default False), so the rename is durable too.
``unique``
    False (default): the temporary file is ``<path>.tmp<suffix>``, and a leftover of a killed
    writer is overwritten by the next write. True: ``<path>.tmp.<pid>.<random><suffix>``,
    created exclusively, for files that several processes may write at once.
``suffix``
    appended to the temporary name; e.g. ".png", so that matplotlib's ``savefig`` infers the
    format from the temporary path as it would from the target.
``permissions``
    the mode the temporary file is created with, before the umask (default 0o666, as ``open``).

The directory must exist; these functions do not create it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import IO, Any, Callable, Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


def fsync_dir(path: PathLike) -> None:
    """Make a rename in directory ``path`` durable (POSIX: the directory entry is data of the
    directory)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(path: str, suffix: str, unique: bool, permissions: int) -> tuple:
    """Create the temporary file beside ``path``; return (fd open for writing, its path)."""
    if not unique:
        tmp = f"{path}.tmp{suffix}"
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, permissions), tmp
    while True:
        tmp = f"{path}.tmp.{os.getpid()}.{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions), tmp
        except FileExistsError:
            continue


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _commit(tmp: str, path: str, sync_dir: bool) -> None:
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_path(path: PathLike, *, fsync: bool = True, sync_dir: bool = False, unique: bool = False,
                suffix: str = "", permissions: int = 0o666) -> Iterator[str]:
    """Yield the path of an (empty) temporary file for a library that writes by path
    (``savefig``, ``torch.save``, ``pyarrow.parquet.write_table``); on a normal exit, rename it
    over ``path``, on an exception remove it::

        with atomic_path("loss.png", suffix=".png", fsync=False) as tmp:
            figure.savefig(tmp)
    """
    path = os.fspath(path)
    fd, tmp = _create_temp(path, suffix, unique, permissions)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _commit(tmp, path, sync_dir)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", *, encoding: Optional[str] = "utf-8",
                newline: Optional[str] = None, fsync: bool = True, sync_dir: bool = False,
                unique: bool = False, suffix: str = "", permissions: int = 0o666) -> Iterator[IO]:
    """Yield a file object ("w": text in ``encoding``, None meaning the locale's as ``open``;
    "wb": bytes) for a writer that streams; on a normal exit it is flushed, fsynced if asked,
    closed and renamed over ``path``; on an exception it is closed and removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r}, expected 'w' or 'wb'")
    path = os.fspath(path)
    fd, tmp = _create_temp(path, suffix, unique, permissions)
    try:
        if mode == "wb":
            handle = os.fdopen(fd, "wb")
        else:
            handle = os.fdopen(fd, "w", encoding=encoding, newline=newline)
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise
    try:
        with handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        _commit(tmp, path, sync_dir)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes_atomic(path: PathLike, data: bytes, **options) -> None:
    """Atomically replace ``path`` with ``data`` (options: see the module docstring)."""
    with atomic_open(path, "wb", **options) as handle:
        handle.write(data)


def write_text_atomic(path: PathLike, text: str, *, encoding: Optional[str] = "utf-8", **options) -> None:
    """Atomically replace ``path`` with ``text`` in ``encoding`` (None: the locale's)."""
    with atomic_open(path, "w", encoding=encoding, **options) as handle:
        handle.write(text)


def write_json_atomic(path: PathLike, obj: Any, *, indent: Optional[int] = None, sort_keys: bool = False,
                      ensure_ascii: bool = True, default: Optional[Callable] = None, end: str = "",
                      encoding: Optional[str] = "utf-8", **options) -> None:
    """Atomically replace ``path`` with ``json.dump(obj, indent=, sort_keys=, ensure_ascii=,
    default=)`` followed by ``end`` (e.g. "\\n"). An object that fails to serialise leaves the
    old file and no temporary file."""
    with atomic_open(path, "w", encoding=encoding, **options) as handle:
        json.dump(obj, handle, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii, default=default)
        handle.write(end)
