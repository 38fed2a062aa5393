"""Issue 37 items 3 and 6: a corpus too small for its split is refused in one line before
megatron-core is called (it used to loop forever in GPTDataset._get_num_epochs), validation can
be turned off, and blend weights are checked whatever their source. Real lm2-preprocess shards
with the embedded tokenizer, real lm2-train processes under a timeout (a hang fails the test)."""

import json
import os

import pytest

from megatron_lm2.preprocess.cli import main as preprocess

from test_faults import _one_line_error, _train, _train_records

TRAIN = ["--flavor", "debug", "--num-layers", "1", "--seq-length", "64", "--memory-chunk-size", "32",
         "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3", "--min-lr", "1e-4",
         "--lr-warmup-iters", "1", "--log-interval", "1"]


def _shards(directory, texts):
    src = directory / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = directory / "shards"
    assert preprocess(["--input", str(src), "--output", str(out), "--workers", "0", "--no-progress"]) == 0
    return out


def _documents_and_tokens(out):
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest["totals"]["documents"], manifest["totals"]["tokens"]


@pytest.fixture(scope="module")
def sixteen(tmp_path_factory):
    """16 documents, enough tokens for training, but 0.02 x 16 rounds to 0 validation documents."""
    directory = tmp_path_factory.mktemp("sixteen")
    return _shards(directory, [" ".join(f"story {i} word {j}" for j in range(60)) for i in range(16)])


def test_one_tiny_document_is_refused_not_a_hang(tmp_path):
    out = _shards(tmp_path, ["seven tokens or so"])
    documents, tokens = _documents_and_tokens(out)
    assert documents == 1 and tokens < 65
    line = _one_line_error(_train(*TRAIN, "--data-path", str(out), "--train-iters", "2"), "lm2-train")
    assert "the training split of" in line and f"({1} documents, {tokens} tokens)" in line, line
    assert "less than one sequence of 65 tokens" in line and "give more data" in line


def test_a_validation_split_of_no_documents_is_refused_when_validation_runs(sixteen, tmp_path):
    line = _one_line_error(_train(*TRAIN, "--data-path", str(sixteen), "--train-iters", "4", "--eval-interval", "2",
                                  "--eval-iters", "1", "--save", str(tmp_path / "c")), "lm2-train")
    assert "--split 98,2,0: the validation split of" in line and "documents 16..16 of its 16" in line, line
    assert "--eval-iters 0" in line
    assert not os.path.exists(tmp_path / "c" / "latest")


def test_without_validation_a_small_corpus_trains(sixteen, tmp_path):
    """The default run (no --eval-interval) hung on this corpus: megatron built the unused
    validation split and asked its 0 documents for one token."""
    result = _train(*TRAIN, "--data-path", str(sixteen), "--train-iters", "3", "--save", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["step"] for r in _train_records(str(tmp_path / "c" / "metrics.jsonl"))] == [1, 2, 3]


def test_eval_iters_0_turns_validation_off(sixteen, tmp_path):
    result = _train(*TRAIN, "--data-path", str(sixteen), "--train-iters", "4", "--eval-interval", "2",
                    "--eval-iters", "0", "--split", "100,0,0", "--save", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in open(tmp_path / "c" / "metrics.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert not [r for r in records if r["kind"] not in ("train", "run")], records


def test_the_train_documents_do_not_move_when_validation_is_off(sixteen):
    """Skipping an unused split must not widen the training split: its bounds stay --split's."""
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.data import build_datasets, resolve_source

    train = parse_args([*TRAIN, "--data-path", str(sixteen), "--train-iters", "2", "--split", "50,50,0"],
                       world_size=1)
    source = resolve_source(train)
    train_set, valid_set = build_datasets(train, source, 64)
    assert valid_set is None
    # 50 % of 16 documents: the training split holds documents 0..7 only.
    assert sorted(set(train_set.document_index.tolist())) == list(range(8))


@pytest.mark.parametrize("weight,message", [
    ("-1", "weight -1 for"), ("0", "to leave a prefix out, remove it"), ("nan", "weight nan for"),
    ("inf", "weight inf for"),
])
def test_bad_blend_weights_are_one_line_from_either_source(sixteen, tmp_path, weight, message):
    prefix = json.loads((sixteen / "blend.json").read_text())["prefixes"][0]
    prefix = str((sixteen / prefix).resolve()) if not os.path.isabs(prefix) else prefix
    line = _one_line_error(_train(*TRAIN, "--data-path", weight, prefix, "1", prefix, "--train-iters", "2",
                                  "--tokenizer", "default"), "lm2-train")
    assert line.startswith("lm2-train: error: --data-path: ") and message in line and "finite and positive" in line
    blend = tmp_path / "shards"
    os.makedirs(blend)
    for name in ("manifest.json",):
        (blend / name).write_text((sixteen / name).read_text())
    (blend / "blend.json").write_text(json.dumps({"prefixes": [prefix], "weights": [float(weight)]}))
    line = _one_line_error(_train(*TRAIN, "--blend-file", str(blend / "blend.json"), "--train-iters", "2"),
                           "lm2-train")
    assert f"--blend-file {blend / 'blend.json'}: weight" in line and message in line, line


# ------------------------------------------------- item 2: shards checked against the model
def _copy(out, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(out, target)
    return target


def _prefix(out):
    return str((out / json.loads((out / "manifest.json").read_text())["shards"][0]["prefix"]).resolve())


def _rewrite_lengths(prefix, change):
    """Rewrite an .idx in place, its size unchanged: `change(lengths)` edits the int32 lengths."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import _IndexReader

    index = _IndexReader(prefix + ".idx", multimodal=False)
    lengths = np.array(index.sequence_lengths, dtype=np.int32)
    offset = 9 + 8 + 1 + 8 + 8  # header, version, dtype code, sequence count, document count
    del index
    change(lengths)
    with open(prefix + ".idx", "r+b") as handle:
        handle.seek(offset)
        handle.write(lengths.tobytes())


def test_an_idx_rewritten_in_place_is_refused_by_its_manifest_digest(sixteen, tmp_path):
    out = _copy(sixteen, tmp_path)
    prefix = _prefix(out)
    size = os.path.getsize(prefix + ".idx")

    def shift(lengths):  # same total, same last entry: size and sum checks pass
        lengths[0] += 3
        lengths[1] -= 3
    _rewrite_lengths(prefix, shift)
    assert os.path.getsize(prefix + ".idx") == size
    line = _one_line_error(_train(*TRAIN, "--data-path", str(out), "--train-iters", "2"), "lm2-train")
    assert f"data index {prefix}.idx: sha256 differs from the one its manifest recorded" in line, line


def _bare_shard(directory, documents, dtype="uint16"):
    """A shard as Megatron-LM's own tool leaves it: .bin/.idx, no manifest anywhere above."""
    from megatron_lm2.preprocess.shards import write_shard

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "bare")
    write_shard(prefix, documents, dtype)
    return prefix


def test_doubled_lengths_without_a_manifest_are_refused(tmp_path):
    import numpy as np

    prefix = _bare_shard(str(tmp_path / "bare"), [np.arange(1, 100) % 2000 for _ in range(20)])

    def double(lengths):
        lengths[:-1] *= 2
    _rewrite_lengths(prefix, double)
    line = _one_line_error(_train(*TRAIN, "--data-path", prefix, "--tokenizer", "default", "--train-iters", "2"),
                           "lm2-train")
    assert f"data index {prefix}.idx: its document lengths add up to" in line, line


def test_ids_outside_the_vocabulary_are_found_by_a_cached_scan(tmp_path):
    import numpy as np

    from megatron_lm2.training.shard_check import SCAN_CACHE, check_shards

    documents = [np.arange(1, 200) % 2000 for _ in range(30)]
    documents[17][5] = 3000  # the embedded tokenizer has 2048 ids
    prefix = _bare_shard(str(tmp_path / "bare"), documents)
    save = tmp_path / "run"
    line = _one_line_error(_train(*TRAIN, "--data-path", prefix, "--tokenizer", "default", "--train-iters", "2",
                                  "--save", str(save)), "lm2-train")
    assert f"data shard {prefix}.bin: token id 3000 is outside the model's vocabulary of 2048 (from the scan)" in line
    cache = str(save / "data_cache")
    assert json.load(open(os.path.join(cache, SCAN_CACHE)))[prefix]["max_id"] == 3000
    # The second look reads the cache, not the .bin; a rewritten .bin is scanned again.
    with pytest.raises(Exception, match=r"from the scan cache"):
        check_shards([prefix], 2048, None, cache)
    documents[17][5] = 7
    _bare_shard(str(tmp_path / "bare"), documents)
    facts = check_shards([prefix], 2048, None, cache)
    assert facts["by_source"] == {"scan": 1} and facts["scanned_bytes"] == os.path.getsize(prefix + ".bin")
    assert check_shards([prefix], 2048, None, cache)["by_source"] == {"scan cache": 1}


def test_a_tokenizer_other_than_the_shards_is_refused_by_fingerprint(sixteen, tmp_path):
    corpus = tmp_path / "words.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(f"w{(i * 31 + j) % 997}x{j}" for j in range(30))}) + "\n"
                             for i in range(400)))
    other = tmp_path / "other.model"
    from test_faults import _module

    made = _module("megatron_lm2.tokenizer.train", "--input", str(corpus), "--output", str(other), "--vocab-size", "275")
    assert made.returncode == 0, made.stderr[-2000:]
    line = _one_line_error(_train(*TRAIN, "--data-path", _prefix(sixteen), "--tokenizer", str(other),
                                  "--train-iters", "2"), "lm2-train")
    assert f"--tokenizer {other}: sha256" in line and "but the shards' manifest" in line, line


# ---------------------------------------------- item 4: caches that know their shards
def test_rebuilt_shards_get_a_new_index_cache(tmp_path):
    import shutil

    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.data import build_datasets, resolve_source

    cache = tmp_path / "cache"

    def documents_trained(n):
        if (tmp_path / "shards").exists():
            shutil.rmtree(tmp_path / "shards")
        _shards(tmp_path, [" ".join(f"tale {i} word {j}" for j in range(60)) for i in range(n)])
        train = parse_args([*TRAIN, "--data-path", str(tmp_path / "shards"), "--train-iters", "2",
                            "--data-cache-path", str(cache)], world_size=1)
        train_set, _ = build_datasets(train, resolve_source(train), 64)
        return len(set(train_set.document_index.tolist()))

    assert documents_trained(16) == 16  # round(0.98 x 16)
    assert documents_trained(50) == 49  # the old cache held documents 0..15 of the same paths
    assert len([d for d in os.listdir(cache) if d.startswith("shards-")]) == 2
