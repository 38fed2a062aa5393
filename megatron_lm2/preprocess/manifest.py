"""The output directory's bookkeeping: ``run.json`` (settings a rerun must match) and
``manifest.json`` (every shard, the tokenizer, totals, skipped rows; written last by rank 0).

``load_manifest(out_dir)`` is what the trainer calls: it returns the manifest dict with each
shard's absolute prefix under ``shards[i]["path"]``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from megatron_lm2.cli_errors import UserInputError
from megatron_lm2.preprocess.readers import InputFile
from megatron_lm2.preprocess.shards import load_state, write_json_atomic

MANIFEST = "manifest.json"
RUN = ".progress/run.json"
FORMAT = "megatron-lm2/preprocess-manifest"
MAX_LISTED_SKIPS = 10000


class OutputDirError(UserInputError):
    """The output directory holds work from an incompatible earlier run."""


def check_or_write_run(out_dir: Path, run: dict, write: bool) -> None:
    """Refuse to mix shards of different settings in one directory; record ours if first."""
    path = out_dir / RUN
    previous = None
    if path.is_file():
        previous = json.loads(path.read_text())
    elif (out_dir / MANIFEST).is_file():
        previous = {"tokenizer": json.loads((out_dir / MANIFEST).read_text()).get("tokenizer")}
    if previous is not None:
        old, new = previous.get("tokenizer") or {}, run["tokenizer"]
        if old.get("sha256") != new["sha256"]:
            raise OutputDirError(
                f"output directory {out_dir} already holds shards made with tokenizer "
                f"{old.get('name')} (sha256 {str(old.get('sha256'))[:12]}…); this run uses {new['name']} "
                f"(sha256 {new['sha256'][:12]}…). Use another --output or delete {out_dir}.")
        for key in ("shard_tokens", "json_key", "dtype"):
            if key in previous and previous[key] != run[key]:
                raise OutputDirError(f"output directory {out_dir} was written with {key}={previous[key]!r}, "
                                     f"this run has {key}={run[key]!r}; rerun with the same value or use another --output")
        sizes = {f["path"]: f["size"] for f in previous.get("files", [])}
        for f in run["files"]:
            if f["path"] in sizes and sizes[f["path"]] != f["size"]:
                raise OutputDirError(f"input {f['path']} changed size since the run that wrote {out_dir} "
                                     f"({sizes[f['path']]} -> {f['size']} bytes); its shards would not match")
    if write:
        # Keep the earliest record of each input's size; add inputs this run brings.
        known = {f["path"] for f in (previous or {}).get("files", [])}
        files = (previous or {}).get("files", []) + [f for f in run["files"] if f["path"] not in known]
        if previous is None or files != previous.get("files"):
            write_json_atomic(path, {**run, "files": files})


# What the trainer's start-up check reads instead of the .bin (training/shard_check.py).
SHARD_FACTS = ("max_id", "bin_bytes", "idx_bytes", "idx_sha256")


def build_manifest(out_dir: Path, files: list[InputFile], run: dict, command: list[str]) -> dict:
    shards, file_entries, listed = [], [], []
    skipped: Counter = Counter()
    subsets: dict[str, dict] = {}
    for f in files:
        state = load_state(out_dir, f)
        if state.done is None:
            raise RuntimeError(f"{f.path} is not finished; cannot write the manifest")
        f_skipped: Counter = Counter(state.done["skipped"])
        for record in state.shards:
            f_skipped.update(record["skipped"])
        # row order: each shard's skips, then those after the last shard
        listed.extend([f.path, *s] for record in state.shards for s in record["skips"])
        listed.extend([f.path, *s] for s in state.done["skips"])
        skipped.update(f_skipped)
        docs = sum(r["documents"] for r in state.shards)
        tokens = sum(r["tokens"] for r in state.shards)
        sub = subsets.setdefault(f.subset, {"files": 0, "documents": 0, "tokens": 0, "shards": 0, "skipped": 0})
        sub["files"] += 1
        sub["documents"] += docs
        sub["tokens"] += tokens
        sub["shards"] += len(state.shards)
        sub["skipped"] += sum(f_skipped.values())
        file_entries.append({"path": f.path, "subset": f.subset, "kind": f.kind, "size": f.size,
                             "rows": state.done["rows"], "documents": docs, "tokens": tokens,
                             "shards": [r["prefix"] for r in state.shards], "skipped": dict(f_skipped),
                             "problems": state.done.get("problems", []),
                             "encoder": state.done.get("encoder", ""),
                             "verification": state.done.get("verification")})
        shards.extend({**{k: r[k] for k in ("prefix", "subset", "source", "rows", "documents", "tokens", "skipped")},
                       **{k: r[k] for k in SHARD_FACTS if k in r},  # absent in records of older runs
                       "encoder": r.get("encoder", "")} for r in state.shards)
    return {
        "format": FORMAT,
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "tokenizer": run["tokenizer"],
        "dtype": run["dtype"],
        "append_eod": True,
        "shard_tokens": run["shard_tokens"],
        "json_key": run["json_key"],
        "totals": {"files": len(files), "documents": sum(s["documents"] for s in shards),
                   "tokens": sum(s["tokens"] for s in shards), "shards": len(shards),
                   "skipped": dict(sorted(skipped.items()))},
        "subsets": subsets,
        "files": file_entries,
        "shards": shards,
        "skipped_rows": [{"file": p, "row": r, "reason": why} for p, r, why in listed[:MAX_LISTED_SKIPS]],
        "skipped_rows_truncated": len(listed) > MAX_LISTED_SKIPS or sum(skipped.values()) > len(listed),
        "encoders": dict(Counter(s["encoder"] for s in shards)),
    }


def write_manifest(out_dir: Path, manifest: dict, fsync: bool = True) -> Path:
    path = out_dir / MANIFEST
    write_json_atomic(path, manifest, fsync)
    return path


def load_manifest(out_dir: str | Path) -> dict:
    """Read ``out_dir/manifest.json``; adds ``path`` (absolute prefix) to every shard."""
    out = Path(out_dir)
    path = out / MANIFEST if out.is_dir() else out
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}: run lm2-preprocess --output {out} first "
                                "(or it was interrupted: rerun the same command to finish it)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a megatron-lm2 preprocessing manifest")
    for shard in manifest["shards"]:
        shard["path"] = str((path.parent / shard["prefix"]).resolve())
    return manifest
