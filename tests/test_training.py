"""The trainer: the same losses at TP1/PP1, TP2, PP2, interleaved PP2 and DP2; NaN/Inf steps
skipped, counted and halting; bf16; weight decay groups; the data order and the DALI loader."""

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

from megatron_lm2.testing import run_distributed

# A shrunk debug LM2: 4 blocks (so PP2 x VPP2 has one block per chunk), 64-token sequences in
# two memory chunks (so the bank write trains), 4 micro-batches of 1 per step.
COMMON = [
    "--flavor", "debug", "--mock-data", "--num-layers", "4", "--seq-length", "64",
    "--memory-chunk-size", "32", "--micro-batch-size", "1", "--global-batch-size", "4",
    "--train-iters", "3", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1",
    "--log-interval", "100", "--keep-last", "0",
]


def _train(argv, save_initial=False):
    """Runs in every rank: train, return per-step losses (every rank knows them)."""
    import torch.distributed as dist

    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    trainer = Trainer(parse_args(argv, world_size=dist.get_world_size()))
    if save_initial:
        trainer.save()  # step 0: the other layouts start from these weights
    history = trainer.run()
    return [record["loss"] for record in history]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TP1/PP1 on one process; saves its initial weights (Megatron draws initial weights in
    build order, which differs per pipeline stage, so other layouts load these)."""
    directory = str(tmp_path_factory.mktemp("reference"))
    losses = run_distributed(_train, 1, COMMON + ["--save", directory], True)[0]
    return directory, losses


@pytest.mark.parametrize(
    "world,tp,pp,vpp",
    [(2, 2, 1, None), (2, 1, 2, None), (2, 1, 2, 2), (2, 1, 1, None)],  # DP2: half a batch per rank
    ids=["tp2", "pp2", "pp2-interleaved", "dp2"],
)
def test_layouts_match_single_process(reference, world, tp, pp, vpp):
    directory, expected = reference
    initial = os.path.join(directory, "iter_0000000")
    extra = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if vpp:
        extra += ["--virtual-pipeline-model-parallel-size", str(vpp)]
    results = run_distributed(_train, world, COMMON + extra + ["--load", initial], tp=tp, pp=pp, vpp=vpp)
    assert len(expected) == 3 and all(math.isfinite(x) for x in expected)
    for losses in results:
        assert np.allclose(losses, expected, rtol=1e-5, atol=0), (losses, expected)
    # Training moved: the losses are not all equal to the first.
    assert len(set(expected)) == 3


def test_recompute_in_a_pipeline_matches_single_process(reference):
    """Full recompute per pipeline stage (block: the first layer of each stage's chunk; TP2
    uniform over each rank's layers) leaves the TP1/PP1 losses as they were."""
    directory, expected = reference
    initial = os.path.join(directory, "iter_0000000")
    for world, tp, pp, extra in ((2, 1, 2, ["--recompute-granularity", "full", "--recompute-method", "block",
                                            "--recompute-num-layers", "1"]),
                                 (2, 2, 1, ["--recompute-granularity", "full"])):
        layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
        results = run_distributed(_train, world, COMMON + layout + extra + ["--load", initial], tp=tp, pp=pp)
        for losses in results:
            assert np.allclose(losses, expected, rtol=1e-5, atol=0), (tp, pp, losses, expected)


# ----------------------------------------------------------------------------- NaN / Inf
def _nan_run(argv, nan_steps):
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    class NaNTrainer(Trainer):
        """Poisons the loss (so the gradients too) at chosen steps (1-based)."""

        def loss_func(self, loss_mask, per_token_loss):
            loss_sum, tokens, report = super().loss_func(loss_mask, per_token_loss)
            if self.step + 1 in nan_steps:
                loss_sum = loss_sum * float("nan")
                report = {key: value * float("nan") for key, value in report.items()}
            return loss_sum, tokens, report

        def train_step(self):
            result = super().train_step()
            first = next(self.model_chunks[0].parameters())
            self.snapshots.append(first.detach().clone())
            return result

    trainer = NaNTrainer(parse_args(argv))
    trainer.snapshots = []
    try:
        history = trainer.run()
    except Exception as error:  # the halt: report it to the test
        return dict(error=f"{type(error).__name__}: {error}", skipped=trainer.skipped_steps)
    same = [torch.equal(a, b) for a, b in zip(trainer.snapshots, trainer.snapshots[1:])]
    return dict(losses=[r["loss"] for r in history], skipped_flags=[r["skipped"] for r in history],
                skipped=trainer.skipped_steps, unchanged=same, scheduler_steps=trainer.scheduler.num_steps)


def _nan_checks():
    skip = _nan_run(COMMON + ["--train-iters", "4"], nan_steps={2})
    halt = _nan_run(COMMON + ["--train-iters", "4", "--max-skipped-steps", "2"], nan_steps={2, 3, 4})
    return skip, halt


def test_nan_steps_are_skipped_counted_and_halt():
    skip, halt = run_distributed(_nan_checks, 1)[0]
    assert "error" not in skip, skip
    assert skip["skipped"] == 1
    assert skip["skipped_flags"] == [False, True, False, False]
    assert math.isnan(skip["losses"][1]) and all(math.isfinite(x) for i, x in enumerate(skip["losses"]) if i != 1)
    # Step 2 left the weights as step 1 had them; steps 3 and 4 changed them again.
    assert skip["unchanged"] == [True, False, False]
    assert skip["scheduler_steps"] == 3  # the LR schedule does not advance on a skipped step
    assert halt["error"].startswith("TrainingHalted: halting at step 3: 2 steps in a row")
    assert halt["skipped"] == 2


# ------------------------------------------------------------------- bf16, weight decay
def _precision_and_decay():
    from megatron_lm2.training.build import no_weight_decay
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    argv = COMMON + ["--train-iters", "2", "--memory-init", "learned"]
    fp32 = Trainer(parse_args(argv))
    # Which model parameters landed in a wd_mult=0 group of the distributed optimizer.
    inner = fp32.optimizer.chained_optimizers[0] if hasattr(fp32.optimizer, "chained_optimizers") else fp32.optimizer
    decay = {}
    for name, param in fp32.model_chunks[0].named_parameters():
        group_index, _ = inner.model_param_group_index_map[param]
        decay[name] = inner.optimizer.param_groups[group_index]["wd_mult"]
    expected = {name: 0.0 if no_weight_decay(p, name) else 1.0 for name, p in fp32.model_chunks[0].named_parameters()}
    fp32_losses = [r["loss"] for r in fp32.run()]
    bf16 = Trainer(parse_args(argv + ["--bf16"]))
    bf16_dtype = next(bf16.model_chunks[0].parameters()).dtype
    bf16_losses = [r["loss"] for r in bf16.run()]
    return decay, expected, fp32_losses, bf16_losses, str(bf16_dtype)


def test_bf16_and_weight_decay_groups():
    decay, expected, fp32_losses, bf16_losses, bf16_dtype = run_distributed(_precision_and_decay, 1)[0]
    assert decay == expected
    no_decay = sorted(n for n, w in decay.items() if w == 0.0)
    # Norm weights, and the learned memory start value, are not decayed; matrices are.
    assert any(n.endswith("memory.initial_bank") for n in no_decay)
    assert any(n.endswith("input_layernorm.weight") for n in no_decay)
    assert all(("norm" in n or n.endswith("initial_bank")) for n in no_decay), no_decay
    assert any(n.endswith("word_embeddings.weight") and w == 1.0 for n, w in decay.items())
    assert any(n.endswith("memory.linear_q.weight") and w == 1.0 for n, w in decay.items())
    assert bf16_dtype == "torch.bfloat16"
    # Same weights, same data: bf16 tracks fp32 to bf16 precision.
    assert np.allclose(bf16_losses, fp32_losses, rtol=2e-2), (bf16_losses, fp32_losses)


def test_fp8_needs_a_gpu_with_transformer_engine():
    from megatron_lm2.config import ConfigError
    from megatron_lm2.training.build import transformer_backend
    from megatron_lm2.training.config import parse_args

    config = parse_args(COMMON + ["--bf16", "--fp8-format", "hybrid"], world_size=1)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU error path does not apply")
    with pytest.raises(ConfigError, match="--fp8-format hybrid needs a CUDA GPU with Transformer Engine"):
        transformer_backend(config)


def test_fp8_amax_flags_reach_the_model_config(capsys):
    """--fp8-amax-history-len / --fp8-amax-compute-algo (issue 34): TE's delayed-scaling defaults
    (1024, max) unless given, on megatron-core's TransformerConfig fields; only with --fp8-format."""
    from megatron_lm2.training.config import parse_args

    fp8 = COMMON + ["--bf16", "--fp8-format", "hybrid"]
    default = parse_args(fp8, world_size=1).model_config()
    assert (default.fp8_amax_history_len, default.fp8_amax_compute_algo) == (1024, "max")
    given = parse_args(fp8 + ["--fp8-amax-history-len", "16", "--fp8-amax-compute-algo", "most_recent"],
                       world_size=1).model_config()
    assert (given.fp8, given.fp8_amax_history_len, given.fp8_amax_compute_algo) == ("hybrid", 16, "most_recent")
    for extra in (["--fp8-amax-history-len", "16"], ["--fp8-amax-compute-algo", "max"]):
        with pytest.raises(SystemExit):
            parse_args(COMMON + extra, world_size=1)
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{extra[0]} {extra[1]} needs --fp8-format" in error
    with pytest.raises(SystemExit):
        parse_args(fp8 + ["--fp8-amax-compute-algo", "mean"], world_size=1)


PROFILE_RUN = ["--flavor", "debug", "--mock-data", "--num-layers", "1", "--seq-length", "32",
               "--memory-chunk-size", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
               "--train-iters", "4",
               "--lr-warmup-iters", "1", "--log-interval", "2"]


def _profiled_run(argv):
    import torch.distributed as dist

    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    trainer = Trainer(parse_args(argv, world_size=dist.get_world_size()))
    trainer.run()
    return trainer.profiler.path


def test_profile_steps_write_a_chrome_trace(tmp_path):
    """--profile-steps 2:4 (issue 34): steps 2 and 3 profiled on rank 0, one Chrome trace JSON."""
    out = tmp_path / "profile"
    path = run_distributed(_profiled_run, 1, PROFILE_RUN + ["--profile-steps", "2:4", "--profile-dir", str(out)])[0]
    assert path == str(out / "trace_rank0_steps2-3.json") and os.listdir(out) == ["trace_rank0_steps2-3.json"]
    with open(path) as handle:
        trace = json.load(handle)
    assert len(trace["traceEvents"]) >= 1


@pytest.mark.parametrize("argv, message", [
    (["--profile-steps", "3:2"], "--profile-steps '3:2': needs 1 <= A < B"),
    (["--profile-steps", "x"], "--profile-steps 'x': expected A:B"),
    (["--profile-steps", "0:2"], "--profile-steps '0:2': needs 1 <= A < B"),
    (["--profile-steps", "1:2", "--profile-ranks", "0,a"], "--profile-ranks '0,a'"),
    (["--profile-steps", "1:2", "--profile-ranks", "0,1"], "--profile-ranks 0,1: rank 1 is not in a world of 1"),
    (["--profile-dir", "d"], "--profile-dir needs --profile-steps"),
])
def test_bad_profile_flags_are_one_line_errors(argv, message, capsys):
    from megatron_lm2.training.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(PROFILE_RUN + argv, world_size=1)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error, error


def test_profile_dir_defaults_under_save():
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.profiling import profile_dir

    assert profile_dir(parse_args(PROFILE_RUN + ["--profile-steps", "1:2", "--save", "ck"], world_size=1)) \
        == os.path.join("ck", "profile")
    assert profile_dir(parse_args(PROFILE_RUN + ["--profile-steps", "1:2"], world_size=1)) \
        == os.path.join("runs", "profile")


def _straggler_run(argv):
    import torch.distributed as dist

    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    Trainer(parse_args(argv, world_size=dist.get_world_size())).run()


def test_straggler_report_in_the_metrics_records(tmp_path):
    """Every log interval the ranks' step times are gathered (issue 34): records carry
    step_time_max / step_time_min / slowest_rank."""
    metrics_file = tmp_path / "metrics.jsonl"
    argv = [a for a in PROFILE_RUN]
    argv[argv.index("--micro-batch-size") + 1] = "1"
    run_distributed(_straggler_run, 2, argv + ["--metrics-file", str(metrics_file)])
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    for record in train:
        assert record["slowest_rank"] in {0, 1}
        assert 0 < record["step_time_min"] <= record["step_time_max"]
        assert record["step_time_min"] <= record["step_time"] <= record["step_time_max"]  # rank 0 own


def test_straggler_stats_and_line():
    from megatron_lm2.training.metrics import straggler_stats, straggler_text

    stats = straggler_stats([1.0, 3.0, 1.5, 1.2])
    assert (stats["step_time_max"], stats["step_time_min"], stats["slowest_rank"]) == (3.0, 1.0, 1)
    assert straggler_text(stats) == "slowest rank 1 3.00 s (2.22 of the median)"


# ----------------------------------------------------------------------------------- data
EOD = 1


def _write_fixture(directory, num_docs=60, seed=0):
    """Documents of consecutive token ids from distinct bases, each ending with EOD, so any
    window of the dataset can be checked against the documents it came from."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "shard_00000")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    docs = []
    for i in range(num_docs):
        length = int(rng.integers(5, 40))
        base = 2 + 40 * i
        doc = list(range(base, base + length)) + [EOD]
        docs.append(doc)
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    manifest = dict(tokenizer=dict(vocab_size=2 + 40 * num_docs, eod=EOD, pad=0, name="fixture"))
    with open(os.path.join(directory, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)
    with open(os.path.join(directory, "blend.json"), "w") as handle:
        json.dump(dict(prefixes=["shard_00000"], weights=[1.0]), handle)
    return docs


def _data_config(directory, extra=()):
    from megatron_lm2.training.config import parse_args

    return parse_args(["--flavor", "debug", "--data-path", directory, "--seq-length", "32",
                       "--memory-chunk-size", "32", "--train-iters", "5", "--lr-warmup-iters", "1",
                       "--global-batch-size", "4", "--micro-batch-size", "2",
                       "--data-cache-path", os.path.join(directory, "cache"), *extra], world_size=1)


def test_dataset_windows_come_from_the_documents(tmp_path):
    from megatron_lm2.training import data

    docs = _write_fixture(str(tmp_path))
    train = _data_config(str(tmp_path))
    source = data.resolve_source(train)
    assert source.tokenizer.eod == EOD and source.tokenizer.vocab_size == 2 + 40 * 60
    train_set, _ = data.build_datasets(train, source, 32)
    starts = {d[0] for d in docs}
    ends = {d[-2] for d in docs}
    seen = set()
    for batch in itertools.islice(data.micro_batches(train_set, 0, 2, 0, 1), 20):
        for tokens, labels in zip(batch["tokens"].tolist(), batch["labels"].tolist()):
            assert tokens[1:] == labels[:-1]
            window = tokens + labels[-1:]
            for a, b in zip(window, window[1:]):
                # inside a document, a document's end, or the start of the next document
                assert b == a + 1 or (a in ends and b == EOD) or (a == EOD and b in starts), (a, b)
            seen.update(t for t in window if t != EOD)
    assert len(seen) > 200  # many documents were visited, not one repeated window


def test_sampler_partitions_batches_and_resumes():
    from megatron_lm2.training.data import MicroBatchSampler

    total, micro, dp = 40, 2, 2
    ranks = [list(MicroBatchSampler(total, 0, micro, r, dp)) for r in range(dp)]
    # Step s of global batch 8 = 2 micro-batches x 2 ranks covers samples [8s, 8s+8) exactly once.
    flat = sorted(i for rank in ranks for batch in rank for i in batch)
    assert flat == list(range(total))
    assert ranks[0][0] == [0, 1] and ranks[1][0] == [2, 3] and ranks[0][1] == [4, 5]
    resumed = list(MicroBatchSampler(total, 16, micro, 1, dp))
    assert resumed == ranks[1][4:]


def test_data_path_errors_name_the_flag_and_file(tmp_path):
    from megatron_lm2.config import ConfigError
    from megatron_lm2.training import data

    with pytest.raises(ConfigError, match=r"--data-path .*: no manifest.json there"):
        data.resolve_source(_data_config(str(tmp_path)))
    _write_fixture(str(tmp_path))
    os.remove(os.path.join(str(tmp_path), "shard_00000.idx"))
    with pytest.raises(ConfigError, match=r"data shard .*shard_00000.idx does not exist \(from --data-path\)"):
        data.resolve_source(_data_config(str(tmp_path)))


def test_dali_loader_yields_the_same_batches(tmp_path):
    try:
        import nvidia.dali  # noqa: F401
    except Exception as error:
        pytest.skip(f"nvidia.dali does not import here ({error}); pip install nvidia-dali-cuda120")
    from megatron_lm2.training import data
    from megatron_lm2.training.dali import dali_micro_batches

    _write_fixture(str(tmp_path))
    train = _data_config(str(tmp_path))
    train_set, _ = data.build_datasets(train, data.resolve_source(train), 32)
    # DP rank 1 of 2, resumed after 8 samples.
    expected = list(itertools.islice(data.micro_batches(train_set, 8, 2, 1, 2), 6))
    got = list(itertools.islice(dali_micro_batches(train_set, 8, 2, 1, 2), 6))
    assert len(got) == 6
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------- metrics
def test_throughput_mfu_and_gate_groups():
    from megatron_lm2.accounting import flops_per_token
    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.training import metrics

    assert metrics.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert metrics.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert metrics.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert metrics.peak_tflops("cpu", "fp32") is None
    fpt = flops_per_token(get_flavor("lm2-1.7b"))
    # 32 GPUs, 524,288 tokens in 1.3 s.
    rates = metrics.throughput(524_288, 1.3, 32, fpt, 989.0)
    per_gpu = 524_288 / 1.3 / 32
    assert rates["tokens_per_sec_per_gpu"] == pytest.approx(per_gpu)
    assert rates["tflops_per_gpu"] == pytest.approx(per_gpu * fpt / 1e12)
    assert rates["mfu"] == pytest.approx(per_gpu * fpt / 1e12 / 989.0)
    assert metrics.throughput(100, 1.0, 1, fpt, None)["mfu"] is None
    stats = {1: dict(out=0.2, **{"in": 0.4}), 2: dict(out=0.4, **{"in": 0.6}), 3: dict(out=1.0)}
    groups = metrics.gate_groups(stats, groups=2)
    assert groups == {"L1-2": {"in": pytest.approx(0.5), "out": pytest.approx(0.3)}, "L3": {"out": 1.0}}
    line = metrics.format_line(dict(step=3, train_iters=9, loss=2.5, grad_norm=0.5, lr=1e-4,
                                    tokens_per_sec_per_gpu=10.0, tflops_per_gpu=0.1, mfu=None,
                                    skipped_steps=0, memory_gates=groups))
    assert "step 3/9" in line and "MFU n/a" in line and "gates L1-2 in 0.500 out 0.300" in line


# ------------------------------------------------------------------- gate statistics
def _gate_logging():
    from megatron_lm2.memory_state import gate_stats, memory_modules
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    trainer = Trainer(parse_args(COMMON + ["--train-iters", "4", "--log-interval", "2"]))
    seen, original = [], trainer.train_step

    def spy():
        for module in memory_modules(trainer.model_chunks).values():
            module.gate_stats = {}
        result = original()
        seen.append(gate_stats(trainer.model_chunks))
        return result

    trainer.train_step = spy
    trainer.run()
    return seen


def test_gate_statistics_come_from_the_logged_training_steps():
    """Training forwards record gate means only on the steps the log shows (they cost a
    reduction per gate), and those are the step's own: not empty, not an evaluation's, not
    a stale earlier step's."""
    seen = run_distributed(_gate_logging, 1)[0]
    assert seen[0] == {} and seen[2] == {}  # steps 1 and 3 are not logged
    for stats in (seen[1], seen[3]):
        assert sorted(stats) == [1, 2, 3, 4]
        assert all(0.0 < v < 1.0 for gates in stats.values() for v in gates.values())
    assert seen[1] != seen[3]  # step 4's gates, after two more updates, are new numbers


# ------------------------------------------------------------- one pass from flags to trainer
def test_lm2_train_builds_the_model_config_once_from_the_data(tmp_path, monkeypatch):
    """lm2-train resolves the data source first, builds the model config once from its
    vocabulary and hands both to the trainer; mock and real data take the same steps."""
    from megatron_lm2 import distributed, train
    from megatron_lm2.training import trainer as trainer_module
    from megatron_lm2.training.config import TrainConfig

    built, started = [], []
    original = TrainConfig.model_config

    def counted(self, *args, **kwargs):
        built.append(kwargs.get("vocab_size", args[0] if args else None))
        return original(self, *args, **kwargs)

    class Started:
        def __init__(self, train_config, model_config, source):
            started.append((model_config, source))

        def run(self):
            return []

    monkeypatch.setattr(TrainConfig, "model_config", counted)
    monkeypatch.setattr(trainer_module, "Trainer", Started)
    monkeypatch.setattr(distributed, "destroy", lambda: None)
    _write_fixture(str(tmp_path))  # its tokenizer: 2402 ids
    common = ["--flavor", "debug", "--seq-length", "32", "--memory-chunk-size", "32", "--train-iters", "5",
              "--lr-warmup-iters", "1", "--global-batch-size", "4", "--micro-batch-size", "2"]
    real = ["--data-path", str(tmp_path)]
    # (flags, the data's vocabulary, the model's): the model's is the data's padded to 128,
    # unless --vocab-size says otherwise; mock data's is the flavor's (debug: 2048) or --vocab-size.
    cases = [(["--mock-data"], 2048, 2048), (["--mock-data", "--vocab-size", "1000"], 1024, 1024),
             (real, 2402, 2432), (real + ["--vocab-size", "3000"], 2402, 3072)]
    for flags, data_vocab, model_vocab in cases:
        built.clear(), started.clear()
        assert train.main(common + flags) == 0
        (model_config, source), = started
        assert built == [data_vocab], flags  # once, from the data source's vocabulary
        assert (source.tokenizer.vocab_size, model_config.vocab_size) == (data_vocab, model_vocab), flags
    built.clear(), started.clear()
    assert train.main(common + real + ["--vocab-size", "100"]) == 2  # smaller than the tokenizer's
    assert started == [] and len(built) == 1
    assert train.main(common + ["--mock-data", "--memory-chunk-size", "5"]) == 2  # a model knob
    assert train.main(common + ["--dry-run", "--gpus-per-node", "1"]) == 0 and len(built) == 3  # the plan: one


def _run_given_model_config():
    from megatron.core.distributed import finalize_model_grads

    from megatron_lm2.training import data
    from megatron_lm2.training.config import TrainConfig, parse_args
    from megatron_lm2.training.trainer import Trainer

    train_config = parse_args(COMMON + ["--train-iters", "2"], check_model=False)
    source = data.resolve_source(train_config)
    model_config = data.model_config_for(train_config, source)
    built, original = [], TrainConfig.model_config
    TrainConfig.model_config = lambda self, *a, **k: built.append(1) or original(self, *a, **k)
    try:
        trainer = Trainer(train_config, model_config, source)
    finally:
        TrainConfig.model_config = original
    (model_chunk,) = trainer.model_chunks
    hooks = (model_config.finalize_model_grads_func is finalize_model_grads,
             model_config.calculate_per_token_loss is True, model_config.no_sync_func == model_chunk.no_sync)
    losses = [record["loss"] for record in trainer.run()]
    return dict(built=len(built), same=trainer.model_config is model_config, hooks=hooks, losses=losses)


def test_the_trainer_trains_on_the_model_config_it_is_given():
    """Given the model config, the trainer builds none; set_schedule_hooks set Megatron's
    fields on it; the losses are those of Trainer(parse_args(...)), which resolves its own."""
    given = run_distributed(_run_given_model_config, 1)[0]
    assert given["built"] == 0 and given["same"] and given["hooks"] == (True, True, True)
    resolved = run_distributed(_train, 1, COMMON + ["--train-iters", "2"])[0]
    assert len(resolved) == 2 and all(math.isfinite(x) for x in resolved)
    assert given["losses"] == resolved


def test_trainer_logging_is_plain_stdout_on_rank_zero(capsys):
    """The trainer's lines reach stdout exactly as print wrote them, on rank 0 only."""
    from megatron_lm2.logs import get_logger, setup_logging

    log = get_logger("megatron_lm2.training.trainer")
    setup_logging(1)
    log.info("step 1/2 | loss 7.6350")
    assert capsys.readouterr() == ("", "")
    setup_logging(0)
    log.info("step 1/2 | loss 7.6350")
    log.warning("iter_0000002 is recorded as not known-good")
    assert capsys.readouterr() == ("step 1/2 | loss 7.6350\nWARNING: iter_0000002 is recorded as not known-good\n", "")


# ------------------------------------------------------------------ activation recompute
def _recompute_runs():
    """Two steps per recompute setting from the same seed: megatron-core's checkpoint calls
    counted, the model's recompute fields, losses and gradient norms."""
    from megatron.core import tensor_parallel

    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    settings = {
        "none": [],
        "full": ["--recompute-granularity", "full"],  # uniform, units of 1 layer
        "full-uniform-2": ["--recompute-granularity", "full", "--recompute-num-layers", "2"],
        "full-block-3": ["--recompute-granularity", "full", "--recompute-method", "block",
                         "--recompute-num-layers", "3"],
        "selective": ["--recompute-granularity", "selective"],
    }
    original, calls = tensor_parallel.checkpoint, []

    def counting(function, distribute_saved_activations, *args):
        calls.append(1)
        return original(function, distribute_saved_activations, *args)

    tensor_parallel.checkpoint = counting
    out = {}
    try:
        for name, extra in settings.items():
            calls.clear()
            trainer = Trainer(parse_args(COMMON + ["--train-iters", "2"] + extra))
            block_config = trainer.model_chunks[0].module.decoder.config
            history = trainer.run()
            out[name] = dict(
                fields=(block_config.recompute_granularity, block_config.recompute_method,
                        block_config.recompute_num_layers),
                calls=len(calls), losses=[r["loss"] for r in history],
                grad_norms=[r["grad_norm"] for r in history])
    finally:
        tensor_parallel.checkpoint = original
    return out


def test_activation_recompute_reaches_the_model_and_changes_no_number():
    """--recompute-granularity/--recompute-method/--recompute-num-layers set megatron-core's
    fields on the built model, it checkpoints the units they ask for (2 steps x 4 micro-batches
    x units per forward), and the losses and gradient norms equal those without recompute."""
    runs = run_distributed(_recompute_runs, 1)[0]
    expected = {
        "none": ((None, None, None), 0),
        "full": (("full", "uniform", 1), 8 * 4),  # 4 layers, one unit each
        "full-uniform-2": (("full", "uniform", 2), 8 * 2),
        "full-block-3": (("full", "block", 3), 8 * 3),
        "selective": (("selective", None, None), 8 * 4),  # the core attention of each layer
    }
    plain = runs["none"]
    assert all(math.isfinite(x) for x in plain["losses"] + plain["grad_norms"]), plain
    for name, (fields, calls) in expected.items():
        run = runs[name]
        assert (run["fields"], run["calls"]) == (fields, calls), (name, run)
        assert np.allclose(run["losses"], plain["losses"], rtol=1e-6, atol=0), (name, run, plain)
        assert np.allclose(run["grad_norms"], plain["grad_norms"], rtol=1e-6, atol=0), (name, run, plain)


def test_recompute_flag_errors_name_the_flag(capsys):
    from megatron_lm2.training.config import parse_args

    base = ["--flavor", "debug", "--mock-data", "--num-layers", "4"]
    cases = {
        ("--recompute-method", "block"): "--recompute-method block needs --recompute-granularity full",
        ("--recompute-granularity", "selective", "--recompute-num-layers", "2"):
            "--recompute-num-layers 2 needs --recompute-granularity full",
        ("--recompute-granularity", "full", "--recompute-num-layers", "3"):
            "--recompute-num-layers 3 does not divide the 4 layers of a model chunk",
        ("--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "5"):
            "--recompute-num-layers 5 is more than the 4 layers of a model chunk",
    }
    for extra, message in cases.items():
        with pytest.raises(SystemExit) as exit:
            parse_args(base + list(extra), world_size=1)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(f"lm2-train: error: {message}"), (extra, err)
        assert err.count("\n") == 1, err


def _tp_comm_overlap_on_cpu():
    from megatron_lm2.config import ConfigError
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    try:
        Trainer(parse_args(COMMON + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                     "--tp-comm-overlap"], world_size=2))
    except ConfigError as error:
        return str(error)
    return None


def test_tp_comm_overlap_is_refused_on_a_cpu():
    """The trainer stops before building a model, in one line naming the flag."""
    for message in run_distributed(_tp_comm_overlap_on_cpu, 2, tp=2):
        assert message and message.startswith("--tp-comm-overlap needs a CUDA GPU") and "\n" not in message


def _manual_gc():
    import gc

    from megatron_lm2.training import trainer as trainer_module
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    runs = {}
    for interval in (0, 2):
        trainer = Trainer(parse_args(COMMON + ["--train-iters", "5", "--manual-gc-interval", str(interval)]))
        calls = []

        class RecordingGC:
            """The trainer's `gc`: records the step of each collection and whether automatic
            collection was off then."""

            @staticmethod
            def collect(*args, **kwargs):
                calls.append((trainer.step, gc.isenabled()))
                return 0

            disable, enable, isenabled = staticmethod(gc.disable), staticmethod(gc.enable), staticmethod(gc.isenabled)

        trainer_module.gc = RecordingGC
        try:
            trainer.run()
        finally:
            trainer_module.gc = gc
        runs[interval] = dict(calls=calls, enabled_after=gc.isenabled())
    return runs


def test_manual_gc_collects_at_the_intended_steps():
    """--manual-gc-interval 2 over 5 steps: automatic collection off for the run, one collection
    before the first step and one after steps 2 and 4; back on afterwards. 0: untouched."""
    runs = run_distributed(_manual_gc, 1)[0]
    assert runs[0] == dict(calls=[], enabled_after=True)
    assert runs[2] == dict(calls=[(0, False), (2, False), (4, False)], enabled_after=True)
