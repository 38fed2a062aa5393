"""The start-up data check at corpus scale (training/shard_check.py; issue 37 item 2).

    python benchmarks/bench_shard_check.py [--tokens 1e9] [--shards 100] [--scan-mb 512]

1. A synthetic shard set of --tokens tokens (uint16, documents of 1,000 tokens) in --shards
   shards with lm2-preprocess's manifest facts. The `.bin` files are sparse (their bytes are
   never read on this path), the `.idx` files real. Target: the check takes <= 2 s.
2. One shard of --scan-mb MB of random ids without a manifest: the vectorised scan, in GB/s
   (first from the disk or page cache, then from the scan cache).
Prints a table; the machine and load are printed with it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time

import numpy as np

from megatron_lm2.preprocess.shards import ShardWriter, index_parts
from megatron_lm2.training.shard_check import check_shards


def make_manifest_set(root: str, tokens: int, shards: int, doc_tokens: int = 1000) -> list:
    per_shard = tokens // shards // doc_tokens
    lengths = np.full(per_shard, doc_tokens, dtype=np.int64)
    records, prefixes = [], []
    for k in range(shards):
        prefix = os.path.join(root, f"part_{k:05d}")
        parts = index_parts(lengths, np.uint16)
        digest = hashlib.sha256()
        with open(prefix + ".idx", "wb") as handle:
            for part in parts:
                digest.update(part)
                handle.write(part)
        with open(prefix + ".bin", "wb") as handle:
            handle.truncate(int(lengths.sum()) * 2)  # sparse: this path never reads it
        records.append({"prefix": os.path.basename(prefix), "documents": per_shard, "tokens": int(lengths.sum()),
                        "max_id": 49151, "idx_sha256": digest.hexdigest()})
        prefixes.append(prefix)
    with open(os.path.join(root, "manifest.json"), "w") as handle:
        json.dump({"shards": records}, handle)
    return prefixes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--scan-mb", type=float, default=512)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        made = time.perf_counter()
        prefixes = make_manifest_set(root, int(args.tokens), args.shards)
        made = time.perf_counter() - made
        result = check_shards(prefixes, 49152, os.path.join(root, "manifest.json"), os.path.join(root, "cache"))
        idx_mb = sum(os.path.getsize(p + ".idx") for p in prefixes) / 1e6
        rows.append((f"{args.tokens:.0e} tokens, {args.shards} shards, with manifest", f"{idx_mb:.0f} MB .idx read, "
                     f"0 B .bin", f"{result['seconds']:.2f} s", "<= 2 s: " + ("met" if result["seconds"] <= 2 else "NOT met")))

        bare = os.path.join(root, "bare")
        os.makedirs(bare)
        ids = np.random.default_rng(0).integers(0, 49152, int(args.scan_mb * 1e6 / 2), dtype=np.uint16)
        writer = ShardWriter(os.path.join(bare, "x.bin"), np.uint16)
        doc = 1000
        for start in range(0, len(ids), 1 << 22):
            piece = ids[start:start + (1 << 22)]
            n = len(piece) // doc
            writer.add(piece[:n * doc], np.full(n, doc))
        writer.finalize(os.path.join(bare, "x.idx"))
        prefix = os.path.join(bare, "x")
        cache = os.path.join(root, "scan-cache")
        scan = check_shards([prefix], 49152, None, cache, show_progress=False)
        gb = scan["scanned_bytes"] / 1e9
        rows.append(("no manifest, first check (scan)", f"{gb:.2f} GB .bin read", f"{scan['seconds']:.2f} s",
                     f"{gb / scan['seconds']:.2f} GB/s"))
        again = check_shards([prefix], 49152, None, cache, show_progress=False)
        rows.append(("no manifest, second check (scan cache)", f"{again['scanned_bytes'] / 1e9:.2f} GB .bin read",
                     f"{again['seconds']:.2f} s", str(again["by_source"])))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"set-up {made:.1f} s; {time.strftime('%Y-%m-%d')}")
    print("| case | read | check | result |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
