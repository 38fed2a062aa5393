"""megatron_lm2.fileio: the target appears whole or not at all, the temporary file goes on
failure, fsync happens when (and only when) asked, permissions and encodings are those of open()."""

from __future__ import annotations

import json
import os
import stat

import pytest

from megatron_lm2 import fileio
from megatron_lm2.fileio import (atomic_open, atomic_path, fsync_dir, write_bytes_atomic, write_json_atomic,
                                 write_text_atomic)


class Boom(Exception):
    pass


@pytest.fixture
def fsyncs(monkeypatch):
    """Paths (via /proc/self/fd) of every fsync, in order."""
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    return calls


def _listing(directory):
    return sorted(os.listdir(directory))


def test_writers_replace_the_file_with_exactly_the_new_content(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    write_text_atomic(target, "héllo\n")
    assert target.read_bytes() == "héllo\n".encode("utf-8")
    write_bytes_atomic(str(target), b"\x00\xffbytes")
    assert target.read_bytes() == b"\x00\xffbytes"
    write_json_atomic(target, {"b": 1, "a": [1, 2]}, indent=1, sort_keys=True, end="\n")
    assert target.read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=1, sort_keys=True) + "\n"
    write_json_atomic(target, ["ü"], ensure_ascii=False, fsync=False)
    assert target.read_bytes() == '["ü"]'.encode("utf-8")
    assert _listing(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("unique", [False, True])
def test_a_failure_mid_write_leaves_the_original_and_no_temporary_file(tmp_path, unique):
    target = tmp_path / "state.json"
    target.write_text('{"step": 1}')
    with pytest.raises(Boom):
        with atomic_open(target, unique=unique) as handle:
            handle.write('{"step": 2, "half')
            handle.flush()
            assert len(_listing(tmp_path)) == 2  # the half-written temporary file exists...
            raise Boom
    assert target.read_text() == '{"step": 1}'  # ...and never replaced the original
    assert _listing(tmp_path) == ["state.json"]

    with pytest.raises(TypeError):  # not JSON-serialisable, found half-way through the dump
        write_json_atomic(target, {"a": 1, "b": object()}, unique=unique)
    assert target.read_text() == '{"step": 1}'
    assert _listing(tmp_path) == ["state.json"]

    with pytest.raises(Boom):
        with atomic_path(target, suffix=".png", unique=unique) as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise Boom
    assert target.read_text() == '{"step": 1}'
    assert _listing(tmp_path) == ["state.json"]


def test_a_failed_rename_removes_the_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "x.txt"
    target.write_text("old")

    def refuse(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["x.txt"]


def test_a_missing_target_is_created_only_once_complete(tmp_path):
    target = tmp_path / "new.txt"
    with atomic_open(target) as handle:
        handle.write("first part, ")
        assert not target.exists()
        handle.write("second part")
    assert target.read_text() == "first part, second part"


def test_fsync_file_and_directory_only_when_asked(tmp_path, fsyncs):
    target = tmp_path / "m.json"
    write_json_atomic(target, {}, fsync=False)
    assert fsyncs == []
    write_json_atomic(target, {})  # default: the file, not the directory
    assert fsyncs == [str(target) + ".tmp"]
    fsyncs.clear()
    write_text_atomic(target, "x", sync_dir=True)
    assert fsyncs == [str(target) + ".tmp", str(tmp_path)]  # data before the rename, the entry after
    fsyncs.clear()
    write_bytes_atomic(target, b"x", fsync=False, sync_dir=True)
    assert fsyncs == [str(tmp_path)]
    fsyncs.clear()
    with atomic_path(target, suffix=".bin") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"by path")
    assert fsyncs == [str(target) + ".tmp.bin"] and target.read_bytes() == b"by path"
    fsyncs.clear()
    with atomic_path(target, fsync=False) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"by path")
    assert fsyncs == []
    fsyncs.clear()
    fsync_dir(tmp_path)
    assert fsyncs == [str(tmp_path)]


def test_no_fsync_when_the_write_fails(tmp_path, fsyncs):
    with pytest.raises(Boom):
        with atomic_open(tmp_path / "f", sync_dir=True):
            raise Boom
    assert fsyncs == []


def test_temporary_names(tmp_path, monkeypatch):
    target = tmp_path / "plot.png"
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append((src, dst)), real(src, dst)))
    with atomic_path(target, suffix=".png", fsync=False) as tmp:
        assert tmp == str(target) + ".tmp.png" and os.path.exists(tmp)
        open(tmp, "wb").close()
    with atomic_path(target, unique=True) as first, atomic_path(target, unique=True) as second:
        assert first != second  # two writers at once do not share a temporary file
        for tmp in (first, second):
            assert os.path.dirname(tmp) == str(tmp_path)
            assert os.path.basename(tmp).startswith(f"plot.png.tmp.{os.getpid()}.")
    assert [dst for _, dst in seen] == [str(target)] * 3


def test_a_stale_fixed_temporary_file_is_overwritten(tmp_path):
    target = tmp_path / "t.txt"
    (tmp_path / "t.txt.tmp").write_text("left by a killed writer, longer than the new text")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert _listing(tmp_path) == ["t.txt"]


@pytest.mark.parametrize("unique", [False, True])
def test_permissions_follow_the_umask_like_open(tmp_path, unique):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a", "x", unique=unique)
        with atomic_path(tmp_path / "b", unique=unique):
            pass
        open(tmp_path / "c", "w").close()
        write_text_atomic(tmp_path / "d", "x", unique=unique, permissions=0o600)
    finally:
        os.umask(old)
    mode = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in "abcd"}
    assert mode == {"a": 0o640, "b": 0o640, "c": 0o640, "d": 0o600}


def test_text_encoding_and_locale(tmp_path, monkeypatch):
    write_text_atomic(tmp_path / "u", "ß")
    assert (tmp_path / "u").read_bytes() == b"\xc3\x9f"
    write_text_atomic(tmp_path / "l", "ß", encoding="latin-1")
    assert (tmp_path / "l").read_bytes() == b"\xdf"
    with atomic_open(tmp_path / "n", encoding=None) as handle, open(tmp_path / "probe", "w") as probe:
        assert handle.encoding == probe.encoding  # None: the locale's, as open()
    with pytest.raises(ValueError, match="mode 'a'"):
        with atomic_open(tmp_path / "x", "a"):
            pass
    assert not (tmp_path / "x.tmp").exists()


def test_stdlib_only():
    source = open(fileio.__file__, encoding="utf-8").read()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "contextlib", "json", "os", "secrets", "typing"}
