"""Blend files: shard prefixes and weights in the form Megatron-core's datasets take.

``load_blend(path)`` returns ``([prefix, ...], [weight, ...])`` — pass it as
``GPTDatasetConfig(blend=load_blend(path))`` to ``BlendedMegatronDatasetBuilder``.

Weights are chosen per subset, then split over a subset's shards in proportion to their tokens:

- ``tokens``: each subset weighs its token count (the natural mix of the data);
- ``paper``: the LM2 paper's SmolLM mix by token counts, 28B Cosmopedia-v2 : 220B FineWeb-Edu
  (Python-Edu excluded); needs subsets named ``cosmopedia-v2*`` and ``fineweb-edu*``;
- ``SUBSET=W,SUBSET=W``: user weights (relative; every subset of the manifest must be named).

CLI (re-blend an existing output without re-tokenizing)::

    python -m megatron_lm2.preprocess.blend --manifest OUT [--weights paper] [--out OUT/blend.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from megatron_lm2.cli_errors import UserInputError
from megatron_lm2.preprocess.shards import write_json_atomic

# LM2 paper, Sec. 4: 28B tokens of Cosmopedia-v2 and 220B of FineWeb-Edu from the SmolLM corpus.
PAPER_MIX = {"cosmopedia-v2": 28e9, "fineweb-edu": 220e9}


class BlendError(UserInputError):
    pass


def parse_weights(spec: str) -> str | dict[str, float]:
    if spec in ("tokens", "paper"):
        return spec
    weights = {}
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip() or not math.isfinite(weights[name.strip()]) or weights[name.strip()] < 0:
            raise BlendError(f"--blend {spec!r}: expected 'tokens', 'paper' or SUBSET=WEIGHT[,SUBSET=WEIGHT...]")
    return weights


def subset_weights(manifest: dict, weights: str | dict[str, float]) -> dict[str, float]:
    tokens = {name: s["tokens"] for name, s in manifest["subsets"].items() if s["tokens"] > 0}
    if weights == "tokens":
        return {name: float(t) for name, t in tokens.items()}
    if weights == "paper":
        chosen = {}
        for family, amount in PAPER_MIX.items():
            names = [n for n in tokens if n.startswith(family)]
            if len(names) != 1:
                raise BlendError(f"--blend paper needs exactly one subset named {family}*; the manifest has "
                                 f"{sorted(tokens) or 'no non-empty subsets'}")
            chosen[names[0]] = amount
        return chosen
    unknown = sorted(set(weights) - set(manifest["subsets"]))
    missing = sorted(set(tokens) - set(weights))
    if unknown or missing:
        raise BlendError(f"blend weights: unknown subsets {unknown}, subsets without a weight {missing} "
                         f"(subsets: {sorted(tokens)})")
    return {name: w for name, w in weights.items() if w > 0 and name in tokens}


def make_blend(manifest: dict, weights: str | dict[str, float] = "tokens") -> dict:
    """Per-shard prefixes (relative to the manifest's directory) and normalized weights."""
    per_subset = subset_weights(manifest, weights)
    total = sum(per_subset.values())
    if total <= 0:
        raise BlendError("blend weights sum to zero")
    prefixes, shard_weights = [], []
    for shard in manifest["shards"]:
        name = shard["subset"]
        if name not in per_subset or shard["tokens"] == 0:
            continue
        prefixes.append(shard["prefix"])
        shard_weights.append(per_subset[name] / total * shard["tokens"] / manifest["subsets"][name]["tokens"])
    return {"weights_from": weights if isinstance(weights, str) else "user",
            "subset_weights": {n: w / total for n, w in per_subset.items()},
            "prefixes": prefixes, "weights": shard_weights}


def write_blend(path: str | Path, manifest: dict, weights: str | dict[str, float] = "tokens") -> Path:
    """Write a blend next to its manifest (prefixes are stored relative to the blend file)."""
    path = Path(path)
    write_json_atomic(path, make_blend(manifest, weights))
    return path


def load_blend(path: str | Path) -> tuple[list[str], list[float]]:
    """``([absolute prefixes], [weights])`` for ``GPTDatasetConfig(blend=...)``."""
    path = Path(path)
    if path.is_dir():
        path = path / "blend.json"
    blend = json.loads(path.read_text())
    prefixes = [p if Path(p).is_absolute() else str((path.parent / p).resolve()) for p in blend["prefixes"]]
    if len(prefixes) != len(blend["weights"]) or not prefixes:
        raise BlendError(f"{path}: needs as many weights as prefixes, and at least one")
    return prefixes, [float(w) for w in blend["weights"]]


def main(argv: list[str] | None = None) -> Path:
    from megatron_lm2.preprocess.manifest import load_manifest

    parser = argparse.ArgumentParser(prog="python -m megatron_lm2.preprocess.blend",
                                     description="Write a blend file for the shards of a preprocessing output.")
    parser.add_argument("--manifest", required=True, help="output directory of lm2-preprocess (or its manifest.json)")
    parser.add_argument("--weights", default="tokens", help="'tokens' (default), 'paper', or SUBSET=W,SUBSET=W")
    parser.add_argument("--out", help="blend file to write (default: blend.json next to the manifest)")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.manifest)
    base = Path(args.manifest) if Path(args.manifest).is_dir() else Path(args.manifest).parent
    out = Path(args.out) if args.out else base / "blend.json"
    if out.parent.resolve() != base.resolve():
        # prefixes are relative to the blend file: rebase them
        for shard in manifest["shards"]:
            shard["prefix"] = shard["path"]
    path = write_blend(out, manifest, parse_weights(args.weights))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
