"""TrainConfig: the one typed configuration of a training run, and its command-line flags.

Every field is one Megatron-style flag (`tensor_model_parallel_size` <-> `--tensor-model-parallel-size`);
the parser is generated from the dataclass by type (bool: a switch; Literal or declared choices: a
choice; tuple/list: several values; any other type converts the text), so the CLI cannot drift
from the config. Defaults train `lm2-1.7b`: the LM2 paper's 1.7B decoder and optimizer with the
recipe's memory (docs/training.md); the paper's own memory is the `lm2-1.7b-paper` flavor.

The model flags are not written here: ModelFlags is generated from the model fields that
megatron_lm2.config declares (LM2Config), each Optional with default None = keep the flavor's
value; set ones override it (`--flavor debug --num-layers 2 --seq-length 128`).

    config = parse_args(["--flavor", "debug", "--train-iters", "10", "--mock-data"])
    model_config = config.model_config()      # LM2Config with the overrides applied
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Sequence

from megatron_lm2.cli_args import ArgumentParser
from megatron_lm2.config import MODEL_FIELDS as DECLARED_MODEL_FIELDS
from megatron_lm2.config import ConfigError, LM2Config, without_optional
from megatron_lm2.training import divergence

DATALOADERS = ("megatron", "dali")
FP8_FORMATS = ("hybrid", "e4m3")
# Delayed scaling's amax window: Transformer Engine's DelayedScaling default (megatron-core's
# TransformerConfig defaults to a window of 1, the current step's amax only).
FP8_AMAX_HISTORY_LEN = 1024
FP8_AMAX_COMPUTE_ALGOS = ("max", "most_recent")
# megatron-core's OptimizerParamScheduler styles; WSD = warmup, stable at --lr, then a decay over
# the last --lr-wsd-decay-iters steps of --lr-decay-iters.
LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
# Activation recompute, megatron-core's TransformerConfig.recompute_granularity / _method.
RECOMPUTE_GRANULARITIES = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def _flag(help: str, *, choices=None, positive=False, nonneg=False, group="training", aliases=()):
    return dict(help=help, choices=choices, positive=positive, nonneg=nonneg, group=group,
                aliases=tuple(aliases))


def _f(default, help, **kw):
    return field(default=default, metadata=_flag(help, **kw))


def _model_flags() -> type:
    """The dataclass of the model flags: --flavor, then every declared model field lm2-train
    overrides, typed Optional[its type], default None (= the flavor's value)."""
    specs = [("flavor", str, _f("lm2-1.7b", "model flavor (megatron_lm2.flavors.list_flavors())", group="model"))]
    for knob in DECLARED_MODEL_FIELDS:
        if knob.flag:
            specs.append((knob.name, Optional[knob.value_type],
                          _f(None, knob.help, choices=knob.choices, positive=knob.positive, group="model")))
    flags = dataclasses.make_dataclass("ModelFlags", specs, kw_only=True)
    flags.__module__ = __name__
    return flags


ModelFlags = _model_flags()


@dataclass(kw_only=True)
class TrainConfig(ModelFlags):
    # ---- model: --flavor and the overrides come from ModelFlags
    transformer_impl: str = _f("auto", "layer implementation: 'te' (Transformer Engine, GPU), 'local', "
                               "or auto (te when CUDA and TE import)", choices=("auto", "local", "te"),
                               group="model")

    # ---- parallelism
    tensor_model_parallel_size: int = _f(1, "tensor-parallel size", positive=True, group="parallel")
    pipeline_model_parallel_size: int = _f(1, "pipeline-parallel size", positive=True, group="parallel")
    virtual_pipeline_model_parallel_size: Optional[int] = _f(
        None, "model chunks per pipeline stage (interleaved 1F1B)", positive=True, group="parallel")
    sequence_parallel: bool = _f(False, "split activations along the sequence across TP ranks "
                                 "(needs --transformer-impl te and TP > 1)", group="parallel")

    # ---- batch and schedule
    micro_batch_size: int = _f(4, "sequences per micro-batch per data-parallel rank", positive=True)
    global_batch_size: int = _f(256, "sequences per optimizer step, all ranks", positive=True)
    train_iters: int = _f(100_000, "optimizer steps in the whole run", positive=True)
    exit_interval: Optional[int] = _f(None, "save and exit when step %% N == 0 (for tests and "
                                      "time-boxed jobs)", positive=True)
    lr: float = _f(2e-4, "peak learning rate", positive=True)
    min_lr: float = _f(2e-5, "learning rate at the end of the decay", nonneg=True)
    lr_warmup_iters: int = _f(700, "linear warmup steps", nonneg=True)
    lr_decay_iters: Optional[int] = _f(None, "decay steps (default: --train-iters)", positive=True)
    lr_decay_style: str = _f("cosine", "decay shape (WSD: warmup-stable-decay)", choices=LR_DECAY_STYLES)
    lr_wsd_decay_iters: Optional[int] = _f(
        None, "WSD: steps of the final decay (they end at --lr-decay-iters)", positive=True,
        aliases=("--lr-wsd-decay-steps",))
    lr_wsd_decay_fraction: Optional[float] = _f(
        None, "WSD: the final decay as a fraction of --lr-decay-iters (instead of --lr-wsd-decay-iters)",
        positive=True)
    lr_wsd_decay_style: str = _f("linear", "WSD: shape of the final decay to --min-lr",
                                 choices=LR_WSD_DECAY_STYLES)
    weight_decay: float = _f(0.1, "AdamW weight decay (not on norms, biases, initial_bank)", nonneg=True)
    adam_beta1: float = _f(0.9, "AdamW beta1", nonneg=True)
    adam_beta2: float = _f(0.95, "AdamW beta2", nonneg=True)
    adam_eps: float = _f(1e-8, "AdamW epsilon", positive=True)
    clip_grad: float = _f(1.0, "clip the global gradient norm to this (0 = off)", nonneg=True)
    bf16: bool = _f(False, "bf16 parameters and compute (fp32 main weights in the optimizer)")
    fp8_format: Optional[str] = _f(None, "FP8 through Transformer Engine (GPU only)", choices=FP8_FORMATS)
    # ---- performance (megatron_lm2.training.build.runtime_settings; auto = on where supported)
    fp8_recipe: str = _f("delayed", "FP8 scaling: delayed (amax history), tensorwise (current "
                         "scaling), blockwise (1x128 blocks, Hopper+)",
                         choices=("delayed", "tensorwise", "blockwise"), group="performance")
    fp8_amax_history_len: Optional[int] = _f(
        None, f"FP8 delayed scaling: steps of amax history the scale is computed from (default "
        f"{FP8_AMAX_HISTORY_LEN}, Transformer Engine's; needs --fp8-format)", positive=True,
        group="performance")
    fp8_amax_compute_algo: Optional[str] = _f(
        None, "FP8 delayed scaling: the amax taken from the history: max (default) or most_recent "
        "(needs --fp8-format)", choices=FP8_AMAX_COMPUTE_ALGOS, group="performance")
    overlap_grad_reduce: str = _f("auto", "overlap the data-parallel gradient reduce-scatter with "
                                  "backward (auto: on GPUs)", choices=("auto", "on", "off"), group="performance")
    overlap_param_gather: str = _f("auto", "overlap the distributed optimizer's parameter all-gather with "
                                   "the next forward (auto: on GPUs)", choices=("auto", "on", "off"),
                                   group="performance")
    fused_kernels: str = _f("auto", "Megatron's fused RoPE, SwiGLU, bias-dropout-add, masked softmax and "
                            "cross-entropy, and gradient-accumulation fusion with TE/Apex (auto: on GPUs)",
                            choices=("auto", "on", "off"), group="performance")
    recompute_granularity: Optional[str] = _f(
        None, "activation recompute (default none): selective = the core attention (scores, "
        "softmax) recomputed in backward; full = whole transformer layers, keeping only their "
        "inputs", choices=RECOMPUTE_GRANULARITIES, group="performance")
    recompute_method: Optional[str] = _f(
        None, "full recompute: uniform = the layers of each model chunk in units of "
        "--recompute-num-layers, each keeping its input (default); block = only the first "
        "--recompute-num-layers layers of each model chunk", choices=RECOMPUTE_METHODS,
        group="performance")
    recompute_num_layers: Optional[int] = _f(
        None, "full recompute: layers per unit (uniform; default 1, must divide the layers of a "
        "model chunk) or layers recomputed per model chunk (block; default all)", positive=True,
        group="performance")
    tp_comm_overlap: bool = _f(
        False, "overlap the tensor-parallel all-gathers/reduce-scatters with the GEMMs through "
        "Transformer Engine's userbuffers (needs a CUDA GPU, TE, --sequence-parallel and "
        "CUDA_DEVICE_MAX_CONNECTIONS=1)", group="performance")
    manual_gc_interval: int = _f(
        0, "turn Python's automatic garbage collection off and collect every N steps, on every "
        "rank at the same step, so no rank stalls alone in a collection while the others wait "
        "for it in a collective (0: automatic collection)", nonneg=True, group="performance")
    seed: int = _f(1234, "random seed (init, data order)", nonneg=True)
    max_skipped_steps: int = _f(5, "halt after this many steps in a row with NaN/Inf loss or "
                                "gradients (each is skipped)", positive=True)
    divergence_loss_factor: float = _f(
        divergence.DEFAULT_LOSS_FACTOR, "divergence guard: halt (before saving) when the loss stays above this many times its running "
        "median for --divergence-loss-steps steps in a row (0 = off)", nonneg=True)
    divergence_loss_steps: int = _f(divergence.DEFAULT_LOSS_PATIENCE, "divergence guard: steps in a row the loss may stay above "
                                    "--divergence-loss-factor x its median", nonneg=True)
    max_weight_rms: float = _f(divergence.DEFAULT_MAX_WEIGHT_RMS, "divergence guard: halt (before saving) when the RMS of all weights "
                               "exceeds this (healthy models: 0.01 .. 1; 0 = off)", nonneg=True)

    # ---- data
    data_path: Optional[List[str]] = _f(
        None, "a preprocessed directory (manifest.json + blend.json), or Megatron-style "
        "'[weight] prefix ...' shard prefixes", group="data")
    blend_file: Optional[str] = _f(None, "blend.json from lm2-preprocess (prefixes + weights)", group="data")
    tokenizer: Optional[str] = _f(
        None, "tokenizer file or directory whose vocab size and end-of-document id the data "
        "uses (default: the one lm2-preprocess recorded in manifest.json)", group="data")
    mock_data: bool = _f(False, "random tokens (MockGPTDataset): smoke runs without data", group="data")
    split: str = _f("98,2,0", "train,valid,test split of the documents", group="data")
    data_cache_path: Optional[str] = _f(
        None, "where GPTDataset index caches go (default: <save>/data_cache or next to the "
        "data); must be on a filesystem every node sees", group="data")
    dataloader: str = _f("megatron", "loader backend", choices=DATALOADERS, group="data")
    num_workers: int = _f(0, "loader worker processes", nonneg=True, group="data")
    eod_mask_loss: bool = _f(False, "no loss on end-of-document targets", group="data")

    # ---- checkpoints
    save: Optional[str] = _f(None, "checkpoint directory to write", group="checkpoint")
    load: Optional[str] = _f(None, "checkpoint directory to resume from (default: --save)",
                             group="checkpoint")
    init_from: Optional[str] = _f(
        None, "start from these weights only (a dist checkpoint, e.g. from lm2-convert from-hf, or a "
        "run directory's latest): fresh optimizer and schedule, step 0; a checkpoint to resume "
        "from in --load/--save wins", group="checkpoint")
    save_interval: Optional[int] = _f(None, "save every N steps", positive=True, group="checkpoint")
    keep_last: int = _f(3, "keep the newest K checkpoints (0 = keep all); the newest known-good one is "
                        "kept too", nonneg=True, group="checkpoint")
    load_fallback: bool = _f(False, "when the checkpoint to resume is damaged (checksums) or not known-good, "
                             "resume from the newest older known-good one instead of stopping",
                             group="checkpoint")
    no_save_on_signal: bool = _f(False, "do not save on SIGTERM / SIGUSR1", group="checkpoint")
    allow_unverified_checkpoint: bool = _f(
        False, "load (resume or --init-from) a checkpoint that has no lm2_integrity.json, unverified: one "
        "written before the record existed; without it such a checkpoint is refused", group="checkpoint")

    # ---- logging and evaluation
    log_interval: int = _f(10, "steps per log line", positive=True, group="logging")
    eval_interval: Optional[int] = _f(None, "validate every N steps", positive=True, group="logging")
    eval_iters: int = _f(10, "validation batches per evaluation (0: no validation)", nonneg=True, group="logging")
    tensorboard_dir: Optional[str] = _f(None, "TensorBoard event directory (default: <save>/tensorboard)",
                                        group="logging")
    wandb_project: Optional[str] = _f(None, "log to this Weights & Biases project (needs wandb)",
                                      group="logging")
    wandb_run_name: Optional[str] = _f(None, "W&B run name", group="logging")
    metrics_file: Optional[str] = _f(None, "append one JSON line per log interval here "
                                     "(default: <save>/metrics.jsonl)", group="logging")
    profile_steps: Optional[str] = _f(
        None, "A:B: torch.profiler over steps A .. B-1 (CPU, and CUDA on GPUs), written as a Chrome "
        "trace JSON into --profile-dir", group="logging")
    profile_ranks: Optional[str] = _f(None, "--profile-steps: the ranks to profile, comma-separated "
                                      "(default 0)", group="logging")
    profile_dir: Optional[str] = _f(None, "--profile-steps: where the traces go (default "
                                    "<save>/profile, or runs/profile without --save)", group="logging")

    # ---- dry run (megatron_lm2.training.plan)
    dry_run: bool = _f(False, "print the layout and launch command for --nodes x --gpus-per-node and "
                       "exit; runs on a CPU", group="plan")
    nodes: int = _f(1, "nodes (dry run)", positive=True, group="plan")
    gpus_per_node: int = _f(8, "GPUs per node (dry run)", positive=True, group="plan")
    gpu: str = _f("H100", "GPU type for the dry run's MFU/memory table", group="plan")

    # ------------------------------------------------------------------------------
    # The model fields lm2-train overrides (ModelFlags' fields but --flavor).
    MODEL_FIELDS = tuple(knob.name for knob in DECLARED_MODEL_FIELDS if knob.flag)

    def validate(self, world_size: Optional[int] = None, check_model: bool = True) -> None:
        """Cross-field checks; ConfigError names the flag(s). check_model=False leaves the model's
        knobs to the one place the run's model config is built (lm2-train builds it once, after
        the data source gives the vocabulary: megatron_lm2.training.data.model_config_for)."""
        from megatron_lm2.flavors import list_flavors

        if self.flavor not in list_flavors():
            raise ConfigError(f"--flavor {self.flavor!r}: known flavors are {', '.join(list_flavors())}")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{flag(name)} {getattr(self, name)} must be in [0, 1)")
        decay = self.lr_decay_iters or self.train_iters
        if self.lr_warmup_iters >= decay:
            raise ConfigError(
                f"--lr-warmup-iters {self.lr_warmup_iters} must be smaller than the decay length "
                f"{decay} (--lr-decay-iters, default --train-iters)")
        if self.lr_wsd_decay_iters and self.lr_wsd_decay_fraction:
            raise ConfigError("give one of --lr-wsd-decay-iters, --lr-wsd-decay-fraction")
        if self.lr_decay_style == "WSD":
            if self.lr_wsd_decay_fraction is not None and self.lr_wsd_decay_fraction > 1:
                raise ConfigError(f"--lr-wsd-decay-fraction {self.lr_wsd_decay_fraction} must be in (0, 1]")
            wsd = self.wsd_decay_iters()
            if wsd is None:
                raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters or --lr-wsd-decay-fraction")
            if wsd > decay - self.lr_warmup_iters:
                raise ConfigError(
                    f"--lr-wsd-decay-iters {wsd} is longer than the steps after warmup "
                    f"({decay} - --lr-warmup-iters {self.lr_warmup_iters})")
        elif self.lr_wsd_decay_iters or self.lr_wsd_decay_fraction:
            raise ConfigError("--lr-wsd-decay-iters/--lr-wsd-decay-fraction need --lr-decay-style WSD")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not a multiple of "
                f"--micro-batch-size {self.micro_batch_size}")
        if self.fp8_format and not self.bf16:
            raise ConfigError(f"--fp8-format {self.fp8_format} needs --bf16 (FP8 GEMMs with bf16 elsewhere)")
        for name in ("fp8_amax_history_len", "fp8_amax_compute_algo"):
            if getattr(self, name) is not None and not self.fp8_format:
                raise ConfigError(f"{flag(name)} {getattr(self, name)} needs --fp8-format")
        sources = [bool(self.mock_data), bool(self.data_path), bool(self.blend_file)]
        if sum(sources) > 1 or (sum(sources) == 0 and not self.dry_run):
            raise ConfigError("give exactly one of --mock-data, --data-path, --blend-file")
        try:
            split = [float(x) for x in self.split.split(",")]
            if len(split) != 3 or min(split) < 0 or split[0] <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--split {self.split!r}: expected three non-negative numbers like 98,2,0 "
                              f"with a positive train share") from None
        if self.eval_interval and self.eval_iters and split[1] == 0:
            raise ConfigError(f"--eval-interval {self.eval_interval} needs a validation share in --split "
                              f"(got {self.split!r})")
        if self.tp_comm_overlap and not (self.sequence_parallel and self.tensor_model_parallel_size > 1):
            raise ConfigError(
                "--tp-comm-overlap needs --sequence-parallel with --tensor-model-parallel-size > 1 "
                f"(got --tensor-model-parallel-size {self.tensor_model_parallel_size}"
                + ("" if self.sequence_parallel else ", no --sequence-parallel") + ")")
        if self.recompute_granularity != "full":
            for name in ("recompute_method", "recompute_num_layers"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{flag(name)} {getattr(self, name)} needs --recompute-granularity full")
        if self.profile_steps is not None:
            from megatron_lm2.training.profiling import parse_ranks, parse_steps

            parse_steps(self.profile_steps)
            if self.profile_ranks is not None:
                ranks = parse_ranks(self.profile_ranks)
                if world_size is not None and ranks[-1] >= world_size:
                    raise ConfigError(f"--profile-ranks {self.profile_ranks}: rank {ranks[-1]} is not in "
                                      f"a world of {world_size}")
        elif self.profile_ranks is not None or self.profile_dir is not None:
            raise ConfigError(("--profile-ranks" if self.profile_ranks is not None else "--profile-dir")
                              + " needs --profile-steps A:B")
        if self.save_interval and not self.save:
            raise ConfigError("--save-interval needs --save DIR")
        if world_size is not None:
            self.data_parallel_size(world_size)
        if check_model:
            self.model_config()  # the model knobs validate themselves (LM2Config)

    def virtual_pipeline_size(self) -> Optional[int]:
        """Model chunks per pipeline stage when interleaving, else None (VPP means nothing
        without PP > 1): the value Megatron's parallel state and schedules take."""
        if self.pipeline_model_parallel_size > 1:
            return self.virtual_pipeline_model_parallel_size
        return None

    def recompute_fields(self, num_layers: int) -> dict:
        """megatron-core's recompute fields for these flags. Full: uniform (default) checkpoints
        the layers of each model chunk in units of --recompute-num-layers (default 1: every
        layer keeps only its input), which must divide the chunk's layers (megatron-core's
        uniform loop would index past the chunk); block checkpoints the first N layers of each
        chunk (default: all). Selective: megatron-core's default module, the core attention,
        which both specs recompute (the local spec's scores and softmax, TE's fused kernel)."""
        if self.recompute_granularity is None:
            return {}
        if self.recompute_granularity == "selective":
            return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
        method = self.recompute_method or "uniform"
        chunks = self.pipeline_model_parallel_size * (self.virtual_pipeline_size() or 1)
        per_chunk = max(1, num_layers // chunks)
        layers = self.recompute_num_layers or (1 if method == "uniform" else per_chunk)
        if layers > per_chunk:
            raise ConfigError(
                f"--recompute-num-layers {layers} is more than the {per_chunk} layers of a model chunk "
                f"(--num-layers {num_layers} / {chunks} pipeline chunks)")
        if method == "uniform" and per_chunk % layers:
            raise ConfigError(
                f"--recompute-num-layers {layers} does not divide the {per_chunk} layers of a model chunk "
                f"(--recompute-method uniform; --num-layers {num_layers} / {chunks} pipeline chunks)")
        return dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=layers)

    def fp8_amax_fields(self) -> dict:
        """megatron-core's delayed-scaling amax fields for --fp8-amax-* (their defaults: TE's)."""
        return dict(fp8_amax_history_len=self.fp8_amax_history_len or FP8_AMAX_HISTORY_LEN,
                    fp8_amax_compute_algo=self.fp8_amax_compute_algo or "max")

    def wsd_decay_iters(self) -> Optional[int]:
        """Steps of the WSD decay phase (None when not set)."""
        if self.lr_wsd_decay_iters:
            return self.lr_wsd_decay_iters
        if self.lr_wsd_decay_fraction:
            return max(1, round(self.lr_wsd_decay_fraction * (self.lr_decay_iters or self.train_iters)))
        return None

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size}")
        dp = world_size // model_parallel
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size {dp}")
        return dp

    def num_microbatches(self, world_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size(world_size))

    def model_overrides(self) -> dict:
        return {name: getattr(self, name) for name in self.MODEL_FIELDS if getattr(self, name) is not None}

    def model_config(self, vocab_size: Optional[int] = None) -> LM2Config:
        """The flavor with this run's overrides, parallel sizes and precision."""
        import torch

        from megatron_lm2.model import padded_vocab_size

        overrides = self.model_overrides()
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        tp, vpp = self.tensor_model_parallel_size, self.virtual_pipeline_size()
        overrides.update(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=vpp,
            sequence_parallel=self.sequence_parallel and tp > 1,
        )
        if self.bf16:
            overrides.update(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
        if self.fp8_format:
            overrides.update(fp8=self.fp8_format, fp8_recipe="delayed", **self.fp8_amax_fields())
        if vpp:
            # Interleaving: Megatron-LM's default p2p mode. Batched p2p posts the send to the next
            # and to the previous stage on one channel; with PP=2 both peers are the same rank
            # and the activation and gradient messages can be matched crosswise (seen on gloo).
            overrides.update(overlap_p2p_comm=True, batch_p2p_comm=False)
            num_layers = overrides.get("num_layers") or _flavor_field(self.flavor, "num_layers")
            stages = self.pipeline_model_parallel_size * vpp
            if num_layers % stages:
                raise ConfigError(
                    f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size x "
                    f"--virtual-pipeline-model-parallel-size = {stages}")
        try:
            config = _flavor(self.flavor, overrides)
            padded = padded_vocab_size(config.vocab_size, tp)
            if padded != config.vocab_size:
                config = config.replace(vocab_size=padded)
        except ConfigError as error:  # LM2Config names fields; name the flags a user typed
            raise error.named(_flag_or_field) from None
        if config.num_layers % self.pipeline_model_parallel_size:
            raise ConfigError(
                f"--num-layers {config.num_layers} is not divisible by --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size}")
        if config.num_attention_heads % tp:
            raise ConfigError(
                f"--num-attention-heads {config.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {tp}")
        recompute = self.recompute_fields(config.num_layers)
        if recompute:
            try:
                config = config.replace(**recompute)
            except (AssertionError, ValueError) as error:  # TransformerConfig's own checks
                raise ConfigError(f"--recompute-granularity {self.recompute_granularity}: {error}") from None
        return config

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def checkpoint_dir(self) -> Optional[str]:
        return self.load or self.save


def _flavor(name: str, overrides: dict) -> LM2Config:
    from megatron_lm2.flavors import get_flavor

    try:
        return get_flavor(name, **overrides)
    except (AssertionError, ValueError, TypeError) as error:  # TransformerConfig's own checks
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(str(error)) from None


def _flavor_field(name: str, field_name: str):
    from megatron_lm2.flavors import get_flavor

    return getattr(get_flavor(name), field_name)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_or_field(name: str) -> str:
    """A config field's flag when lm2-train has one (--memory-chunk-size), else its name."""
    return flag(name) if name in TrainConfig.__dataclass_fields__ else name


# --------------------------------------------------------------------------- parser
GROUP_DESCRIPTIONS = {"model": "a flavor plus overrides: a model flag left unset keeps the flavor's value"}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="lm2-train",
        description="Pretrain an LM2 model on Megatron-core (docs/training.md). Defaults train lm2-1.7b: "
        "the paper's 1.7B decoder and optimizer with the recipe's memory (the paper's memory: "
        "--flavor lm2-1.7b-paper).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_flags(parser, TrainConfig)
    return parser


def add_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of the dataclass `config_class` (its metadata from _f), chosen by the
    field's type: Optional[X] is X; bool: a switch (store_true); Literal[...] or declared choices:
    one of them; tuple[X, ...] / list[X]: one or more X (a tuple or a list); any other type (int,
    float, str, Path, ...) converts the text itself."""
    groups = {}
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        meta = f.metadata
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(
                meta["group"], GROUP_DESCRIPTIONS.get(meta["group"]))
        names = (flag(f.name), *meta.get("aliases", ()))
        kind, choices = without_optional(hints[f.name]), meta["choices"]
        nargs, action = None, "store"
        if kind is bool:
            group.add_argument(*names, dest=f.name, action="store_true", default=f.default, help=meta["help"])
            continue
        origin = typing.get_origin(kind) or kind
        if origin is Literal:
            choices = choices or typing.get_args(kind)
            kind = type(typing.get_args(kind)[0])
        elif origin in (tuple, list):
            args = typing.get_args(kind)
            if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
                raise TypeError(f"{config_class.__name__}.{f.name}: {kind} has a fixed length; use tuple[X, ...]")
            kind, nargs = (args[0] if args else str), "+"
            action = _StoreTuple if origin is tuple else "store"
        group.add_argument(
            *names, dest=f.name, action=action, type=_checked(kind, f.name, meta), default=f.default,
            choices=choices, nargs=nargs, help=meta["help"],
            metavar=f.name.upper() if choices is None else None,
        )


class _StoreTuple(argparse.Action):
    """nargs="+" as a tuple (a field typed tuple[X, ...] gets one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(values))


def _checked(kind, name, meta):
    def convert(text: str):
        try:
            value = kind(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(value):  # float() takes 'nan' and 'inf'
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if meta["positive"] and value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        if meta["nonneg"] and value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    convert.__name__ = getattr(kind, "__name__", str(kind))
    return convert


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None,
               check_model: bool = True) -> TrainConfig:
    """Flags -> a validated TrainConfig. Bad values exit with status 2 and a message naming the
    flag (argparse's convention). check_model=False (lm2-train): the model's knobs are checked
    where the run builds its model config, once (TrainConfig.validate)."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    config = TrainConfig(**vars(namespace))
    if world_size is None:
        world_size = None if config.dry_run else int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config.validate(world_size, check_model=check_model)
    except ConfigError as error:
        parser.error(str(error))
    return config
