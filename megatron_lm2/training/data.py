"""Training data: Megatron-core's GPTDataset over lm2-preprocess shards (or MockGPTDataset),
built through BlendedMegatronDatasetBuilder, read in a resumable order.

Where the data comes from (docs/preprocess.md):
  --data-path DIR          a preprocessed directory: manifest.json (tokenizer ids) + blend.json
  --blend-file FILE        a blend.json; the manifest.json next to it gives the tokenizer ids
  --data-path [W] PREFIX.. Megatron-style shard prefixes (weights optional); the nearest
                           manifest.json above the first prefix gives the tokenizer ids
  --tokenizer PATH         overrides the manifest's tokenizer ids (and replaces the manifest
                           for bare prefixes)
  --mock-data              random documents, no files

Index caches: BlendedMegatronDatasetBuilder builds on global rank 0 first, then a barrier, then
the other ranks read the cache, so the cache directory must be on a filesystem every node sees.
Every rank calls the builder (a rank that skipped it would leave the others waiting at that
barrier), and every rank reads its own batches: no broadcast inside the TP group is needed
because the order is a pure function of (seed, consumed samples).

Order: the global batch of step s is samples [s*G, (s+1)*G) of the (shuffled) dataset; data
parallel rank r takes micro-batch slices r*m..(r+1)*m of each m*DP slab (Megatron's pretraining
sampler). Resuming at step s needs only `consumed_samples = s*G`.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_lm2.config import ConfigError, LM2Config
from megatron_lm2.flavors import get_flavor
from megatron_lm2.model import padded_vocab_size
from megatron_lm2.training.config import TrainConfig
from megatron_lm2.training.shard_check import check_shard_size, check_shards, read_index


@dataclass(frozen=True)
class TokenizerIds:
    """What GPTDataset needs from a tokenizer (it never tokenizes)."""

    vocab_size: int
    eod: int
    pad: int
    name: str = "unknown"

    @property
    def unique_identifiers(self) -> OrderedDict:  # part of the index cache's hash
        return OrderedDict(cls="TokenizerIds", name=self.name, vocab_size=self.vocab_size, eod=self.eod)


@dataclass(frozen=True)
class DataSource:
    blend: Optional[Tuple[List[str], Optional[List[float]]]]  # None = mock data
    tokenizer: TokenizerIds
    manifest: Optional[str] = None  # where the tokenizer ids came from (a manifest or --tokenizer)
    shard_manifest: Optional[str] = None  # the shards' manifest.json, if any (shard_check.py)


def resolve_source(train: TrainConfig) -> DataSource:
    """Find the shards, their weights and the tokenizer ids; errors name the flag and file.
    The first step of a run: the model's vocabulary follows from it (model_config_for).

    Mock data has no tokenizer: its vocabulary is --vocab-size, else the flavor's, padded as
    the model's will be (the random documents use every id of the model's vocabulary)."""
    if train.mock_data:
        vocab_size = padded_vocab_size(train.vocab_size or get_flavor(train.flavor).vocab_size,
                                       train.tensor_model_parallel_size)
        return DataSource(None, TokenizerIds(vocab_size, eod=0, pad=vocab_size - 1, name="mock"))
    if train.blend_file:
        if not os.path.isfile(train.blend_file):
            raise ConfigError(f"--blend-file {train.blend_file}: no such file")
        prefixes, weights = _load_blend(train.blend_file, "--blend-file")
        manifest = os.path.join(os.path.dirname(os.path.abspath(train.blend_file)), "manifest.json")
        if not os.path.isfile(manifest):
            raise ConfigError(f"--blend-file {train.blend_file}: no manifest.json next to it "
                              f"(lm2-preprocess writes both); the tokenizer's ids come from it")
    elif (len(train.data_path) == 1 and not os.path.isfile(train.data_path[0] + ".bin")
          and not os.path.isfile(train.data_path[0] + ".idx")
          and not os.path.isdir(train.data_path[0])):
        raise ConfigError(f"--data-path {train.data_path[0]}: no such directory (and no "
                          f"{train.data_path[0]}.bin/.idx shard)")
    elif (len(train.data_path) == 1 and os.path.isdir(train.data_path[0])
          and not os.path.isfile(train.data_path[0] + ".bin")):
        directory = train.data_path[0]
        manifest = os.path.join(directory, "manifest.json")
        blend_file = os.path.join(directory, "blend.json")
        for path in (manifest, blend_file):
            if not os.path.isfile(path):
                raise ConfigError(f"--data-path {directory}: no {os.path.basename(path)} there; is it "
                                  f"an lm2-preprocess output directory (finished)?")
        prefixes, weights = _load_blend(blend_file, "--data-path")
    else:
        prefixes, weights = _parse_prefixes(train.data_path)
        manifest = None if train.tokenizer else _find_manifest(prefixes[0])
    where = (f"--blend-file {train.blend_file}" if train.blend_file else
             f"--data-path {train.data_path[0]} (its blend.json)" if len(train.data_path) == 1 else "--data-path")
    check_weights(prefixes, weights, where)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise ConfigError(f"data shard {prefix + suffix} does not exist (from "
                                  f"{'--blend-file' if train.blend_file else '--data-path'})")
        check_shard_size(prefix)
    if len(prefixes) == 1:
        weights = None  # one shard: no BlendedDataset wrapper, the same samples
    ids = _ids_from_tokenizer(train.tokenizer) if train.tokenizer else _tokenizer_ids(manifest)
    shard_manifest = manifest or _find_manifest(prefixes[0], required=False)
    if train.tokenizer and shard_manifest:
        _check_tokenizer_fingerprint(train.tokenizer, ids, shard_manifest)
    return DataSource((prefixes, weights), ids, manifest or train.tokenizer, shard_manifest)


def _check_tokenizer_fingerprint(spec: str, ids: TokenizerIds, manifest: str) -> None:
    """--tokenizer must be the tokenizer the shards were made with: by its sha256, not its name
    (shards of another tokenizer trained normal-looking steps, then crashed on an id)."""
    try:
        with open(manifest) as handle:
            recorded = json.load(handle).get("tokenizer") or {}
    except (OSError, ValueError):
        return  # an unreadable manifest is reported where it is needed
    if recorded.get("sha256") and recorded["sha256"] != ids.name:
        raise ConfigError(
            f"--tokenizer {spec}: sha256 {ids.name[:12]}..., but the shards' manifest {manifest} records "
            f"tokenizer {recorded.get('name')!r} (sha256 {recorded['sha256'][:12]}...); pass the tokenizer the "
            f"shards were made with, or leave --tokenizer out to use the manifest's")


def model_config_for(train: TrainConfig, source: DataSource) -> LM2Config:
    """The run's model config, built once: the flavor with the flags' overrides, parallel sizes
    and precision, and the data's vocabulary (padded) unless --vocab-size says otherwise. Mock
    and real data take this same path, after resolve_source."""
    config = train.model_config(vocab_size=source.tokenizer.vocab_size)
    if source.tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"--vocab-size {config.vocab_size} is smaller than the tokenizer's "
            f"{source.tokenizer.vocab_size} ({source.manifest})")
    return config


def _ids_from_tokenizer(spec: str) -> TokenizerIds:
    from megatron_lm2.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(spec)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--tokenizer {spec}: {error}") from None
    return TokenizerIds(tokenizer.vocab_size, tokenizer.eod, tokenizer.pad, name=tokenizer.sha256)


def _load_blend(path: str, flag: str) -> Tuple[List[str], Optional[List[float]]]:
    try:
        from megatron_lm2.preprocess.blend import load_blend
    except ImportError:  # the preprocessing package is optional at run time
        load_blend = None
    try:
        if load_blend is not None:
            prefixes, weights = load_blend(path)
        else:
            with open(path) as handle:
                blend = json.load(handle)
            base = os.path.dirname(os.path.abspath(path))
            prefixes = [os.path.join(base, p) for p in blend["prefixes"]]
            weights = blend.get("weights")
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"{flag}: cannot read blend file {path}: {error}") from None
    return list(prefixes), (list(map(float, weights)) if weights else None)


def check_weights(prefixes: List[str], weights: Optional[List[float]], where: str) -> None:
    """Blend weights are finite and positive, whatever their source. Zero is refused rather than
    read as "leave it out": megatron-core asserts on it, and a prefix left in with weight 0 is
    more often a typo than a wish (remove the prefix to leave it out)."""
    if weights is None:
        return
    if len(weights) != len(prefixes):
        raise ConfigError(f"{where}: {len(weights)} weights for {len(prefixes)} prefixes")
    for prefix, weight in zip(prefixes, weights):
        if not math.isfinite(weight) or weight <= 0:
            hint = "; to leave a prefix out, remove it from the blend" if weight == 0 else ""
            raise ConfigError(f"{where}: weight {weight:g} for {prefix}: blend weights must be finite and "
                              f"positive{hint}")


def _parse_prefixes(items: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's `--data-path` forms: `p1 p2 ...` or `w1 p1 w2 p2 ...`."""

    def is_number(text):
        try:
            float(text)
            return True
        except ValueError:
            return False

    if len(items) >= 2 and is_number(items[0]):
        if len(items) % 2 or not all(is_number(w) for w in items[0::2]):
            raise ConfigError(f"--data-path {' '.join(items)}: expected 'weight prefix' pairs")
        return list(items[1::2]), [float(w) for w in items[0::2]]
    return list(items), None


def _find_manifest(prefix: str, required: bool = True) -> Optional[str]:
    directory = os.path.dirname(os.path.abspath(prefix))
    for _ in range(4):
        candidate = os.path.join(directory, "manifest.json")
        if os.path.isfile(candidate):
            return candidate
        directory = os.path.dirname(directory)
    if not required:
        return None
    raise ConfigError(f"--data-path {prefix}: no manifest.json in the 4 directories above it; the "
                      f"tokenizer's end-of-document id comes from lm2-preprocess's manifest")


def _tokenizer_ids(manifest: str) -> TokenizerIds:
    try:
        with open(manifest) as handle:
            tokenizer = json.load(handle)["tokenizer"]
        eod = int(tokenizer["eod"])
        pad = tokenizer.get("pad")
        return TokenizerIds(
            vocab_size=int(tokenizer["vocab_size"]), eod=eod, pad=eod if pad is None else int(pad),
            name=str(tokenizer.get("sha256") or tokenizer.get("name") or manifest))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{manifest}: cannot read tokenizer.vocab_size/eod ({error!r})") from None


def _cache_root(train: TrainConfig) -> Optional[str]:
    if train.data_cache_path is not None:
        return train.data_cache_path
    return os.path.join(train.save, "data_cache") if train.save else None


def _log_shard_check(shards: dict, count: int) -> None:
    from megatron_lm2.logs import get_logger

    rate = (f", {shards['scanned_bytes'] / 1e9 / max(shards['seconds'], 1e-9):.2f} GB/s scanned"
            if shards["scanned_bytes"] else "")
    sources = ", ".join(f"{n} from the {k}" for k, n in sorted(shards["by_source"].items()))
    get_logger(__name__).info(
        f"data: {count} shard(s) checked against the model ({sources}) in {shards['seconds']:.2f}s{rate}")


def dataset_config(train: TrainConfig, source: DataSource, seq_length: int,
                   shard_digest: Optional[str] = None) -> GPTDatasetConfig:
    # The index caches live in a folder named by the shards' .idx digests: shards rebuilt at the
    # same paths get new caches, never the old document ranges (megatron-core's own cache key
    # holds the paths, not the contents).
    cache = _cache_root(train)
    if cache is not None and shard_digest is not None:
        cache = os.path.join(cache, f"shards-{shard_digest[:16]}")
    return GPTDatasetConfig(
        random_seed=train.seed,
        sequence_length=seq_length,
        blend=source.blend,
        split=train.split,
        tokenizer=source.tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=train.eod_mask_loss,
        create_attention_mask=False,  # causal (or windowed) mask comes from the model config
        path_to_cache=cache,
        mmap_bin_files=True,
    )


def build_datasets(train: TrainConfig, source: DataSource, seq_length: int):
    """(train, valid) datasets sized for the whole run. Call on every rank."""
    train_samples = train.train_iters * train.global_batch_size
    evaluations = (train.train_iters // train.eval_interval + 1) if train.eval_interval else 0
    valid_samples = evaluations * train.eval_iters * train.global_batch_size
    cls = MockGPTDataset if source.blend is None else GPTDataset
    shards = None
    if source.blend is not None:
        shards = check_shards(source.blend[0], source.tokenizer.vocab_size, source.shard_manifest,
                              _cache_root(train))
        _log_shard_check(shards, len(source.blend[0]))
    config = dataset_config(train, source, seq_length, shards["digest"] if shards else None)
    sizes = [train_samples, valid_samples, 0]
    # A split the run asks nothing of is not built: megatron-core asks even an unused split for
    # one token, and loops forever in GPTDataset._get_num_epochs on a split of 0 documents. The
    # bounds of the other splits stay as --split sets them, so the train documents do not move.
    config.split_matrix = [bounds if (i == 0 or sizes[i] > 0) else None
                           for i, bounds in enumerate(config.split_matrix)]
    if source.blend is not None:
        check_splits(train.split, config.split_matrix, sizes, source.blend, seq_length)
    train_set, valid_set, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    if train_set is None or len(train_set) < train_samples:
        raise ConfigError(f"the training split holds {0 if train_set is None else len(train_set)} "
                          f"samples, fewer than --train-iters x --global-batch-size = {train_samples}")
    return train_set, valid_set


SPLIT_NAMES = ("training", "validation", "test")


def check_splits(split: str, split_matrix, sizes, blend, seq_length: int) -> None:
    """Every split the run draws samples from gets, in every shard of the blend (its weights are
    all positive: check_weights), at least one document and one sequence's worth of tokens
    (seq_length + 1), counted from the .idx as megatron-core will cut it (round(bound x
    documents)); otherwise megatron loops forever or fails at some step. One line naming the
    shard, the split and the counts."""
    for prefix in blend[0]:
        index = read_index(prefix + ".idx")
        documents = len(index.document_indices) - 1
        for i, bounds in enumerate(split_matrix):
            if bounds is None or not sizes[i]:
                continue
            begin, end = int(round(bounds[0] * documents)), int(round(bounds[1] * documents))
            need = seq_length + 1
            # Each document has >= 1 token: the first `need` of them settle the question.
            last = min(end, begin + need)
            sequences = index.document_indices[begin:last + 1]
            tokens = int(index.sequence_lengths[sequences[0]:sequences[-1]].sum()) if last > begin else 0
            if tokens < need:
                off = ("turn validation off (--eval-iters 0, or --split 100,0,0 without --eval-interval)"
                       if i else "give more data")
                raise ConfigError(
                    f"--split {split}: the {SPLIT_NAMES[i]} split of {prefix} gets documents {begin}..{end} "
                    f"of its {documents} ({end - begin} documents, {tokens} tokens), less than one sequence of {need} tokens, and the run asks it for {sizes[i]} "
                    f"samples; change --split, or {off}")


class MicroBatchSampler:
    """Index lists of one micro-batch for this data-parallel rank, from `consumed_samples` on."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        self.total = total_samples
        self.consumed = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank = data_parallel_rank
        self.slab = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // self.slab

    def __iter__(self) -> Iterator[List[int]]:
        lo = self.rank * self.micro_batch_size
        for start in range(self.consumed, self.total - self.slab + 1, self.slab):
            yield list(range(start + lo, start + lo + self.micro_batch_size))


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  num_workers: int = 0) -> Iterator[dict]:
    """Yields {'tokens', 'labels', 'loss_mask', 'position_ids'} micro-batches [m, s]."""
    sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False,
        persistent_workers=num_workers > 0,
    )
    for batch in loader:
        yield {key: batch[key] for key in ("tokens", "labels", "loss_mask", "position_ids")}
