"""Model chunks, optimizer and learning-rate schedule for a TrainConfig.

Model: one LM2 GPTModel chunk per virtual pipeline stage (megatron_lm2.model.build_model),
bf16 through Megatron's Float16Module, wrapped in Megatron-core's DistributedDataParallel with
the distributed optimizer (gradients reduce-scattered, fp32 main weights sharded over DP).
("Model chunk" is a pipeline chunk; a memory chunk is `memory_chunk_size` tokens.)

The model config changes twice on the way, each in one named step: build_model_chunks sets
the hardware's runtime fields before building (apply_runtime_settings: the modules read
them), and set_schedule_hooks then gives Megatron's pipeline schedules what they read off the
config (no_sync_func, grad_sync_func, finalize_model_grads_func, calculate_per_token_loss).

Optimizer: Megatron's AdamW (get_megatron_optimizer) with weight decay on matrices only: no
decay on norms, biases (1-D tensors) or a learned memory start value `initial_bank`, which is
a state, not a projection, and should not be pulled towards zero.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import List

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride
from megatron.core.transformer.module import Float16Module

from megatron_lm2.compat import cuda_available
from megatron_lm2.config import ConfigError, LM2Config
from megatron_lm2.model import build_model
from megatron_lm2.specs import te_available
from megatron_lm2.training.config import TrainConfig


def transformer_backend(train: TrainConfig) -> str:
    """'te' on GPUs with Transformer Engine, 'local' otherwise; FP8 needs TE."""
    if train.transformer_impl != "auto":
        backend = train.transformer_impl
    else:
        backend = "te" if cuda_available() and te_available() else "local"
    if train.fp8_format and (backend != "te" or not cuda_available()):
        raise ConfigError(
            f"--fp8-format {train.fp8_format} needs a CUDA GPU with Transformer Engine installed "
            f"(found cuda={cuda_available()}, transformer_engine={te_available()}, layer "
            f"implementation {backend!r}); drop --fp8-format to train in bf16/fp32")
    if backend == "te" and not te_available():
        raise ConfigError("--transformer-impl te: transformer_engine does not import on this machine")
    return backend


@functools.lru_cache(maxsize=None)
def _importable(name: str) -> bool:
    """Whether the top-level module `name` can be found (cached: it cannot change in a run)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# Apex's CUDA extensions megatron-core imports by bare name, without shipping them.
APEX_WGRAD = "fused_weight_gradient_mlp_cuda"  # the wgrad GEMM accumulating into main_grad
APEX_SOFTMAX = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                "scaled_softmax_cuda")  # FusedScaleMaskSoftmax's kernels (padding/causal/no mask)


def apex_wgrad_available() -> bool:
    """gradient_accumulation_fusion: megatron-core's ColumnParallelLinear (the output layer of
    every backend, and every linear of the local spec) raises at construction unless Apex's
    fused_weight_gradient_mlp_cuda imports, whether or not TE provides its own for the blocks
    (its check: the import at the top of megatron.core.tensor_parallel.layers succeeded)."""
    from megatron.core.tensor_parallel import layers

    return _importable(APEX_WGRAD) and bool(getattr(layers, "_grad_accum_fusion_available", True))


def apex_softmax_available() -> bool:
    """masked_softmax_fusion: megatron-core's FusedScaleMaskSoftmax imports Apex's softmax
    kernels when a bf16/fp16 score matrix has a kernel-friendly shape; missing, that forward
    raises ModuleNotFoundError (it does not fall back)."""
    return all(_importable(name) for name in APEX_SOFTMAX)


def _resolve(choice: str, supported: bool, flag: str, why: str) -> bool:
    if choice == "on" and not supported:
        raise ConfigError(f"{flag} on: {why}")
    return supported if choice == "auto" else choice == "on"


def runtime_settings(train: TrainConfig, backend: str, cuda: bool, apex_wgrad: bool = False,
                     apex_softmax: bool = False) -> dict:
    """Model-config fields and DDP switches for the hardware this run is on (the flavors only
    define architectures; their CPU-safe defaults are replaced here). On GPUs: weights
    initialised on the device (not every rank building full fp32 weights on its CPU), Megatron's
    fused RoPE (TE) / SwiGLU / bias-dropout-add / cross-entropy, the masked softmax where Apex's
    softmax kernels import (`apex_softmax`), gradient-accumulation fusion where Apex's wgrad GEMM
    imports (`apex_wgrad`), the DP gradient reduce-scatter overlapped with backward and the
    parameter all-gather with the next forward. On CPU all off. The probes are parameters (the
    trainer passes apex_*_available()) so a test can ask for a GPU without Apex on a CPU.
    `--fused-kernels`, `--overlap-grad-reduce`, `--overlap-param-gather` on/off/auto."""
    te = backend == "te"
    fused = _resolve(train.fused_kernels, cuda, "--fused-kernels",
                     "Megatron's fused kernels need a CUDA GPU")
    model = dict(
        use_cpu_initialization=not cuda,
        bias_activation_fusion=fused,  # SwiGLU (jit-fused)
        bias_dropout_fusion=fused,
        # Local spec only; megatron-core imports Apex's kernels unguarded, so only where they exist.
        masked_softmax_fusion=fused and apex_softmax,
        apply_rope_fusion=fused and te,  # Megatron's fused RoPE is TE's
        cross_entropy_loss_fusion=fused,
        # TE's linears have their own, but the output layer is megatron-core's, which needs Apex's.
        gradient_accumulation_fusion=fused and apex_wgrad,
    )
    if train.fp8_format:
        model["fp8_recipe"] = getattr(train, "fp8_recipe", "delayed")
    if getattr(train, "tp_comm_overlap", False):
        check_tp_comm_overlap(backend, cuda)
        model["tp_comm_overlap"] = True
    ddp = dict(
        overlap_grad_reduce=_resolve(getattr(train, "overlap_grad_reduce", "auto"), cuda,
                                     "--overlap-grad-reduce", "needs CUDA streams (a GPU)"),
        overlap_param_gather=_resolve(getattr(train, "overlap_param_gather", "auto"), cuda,
                                      "--overlap-param-gather", "needs CUDA streams (a GPU)"),
    )
    return dict(model=model, ddp=ddp)


def check_tp_comm_overlap(backend: str, cuda: bool, environ=None) -> None:
    """--tp-comm-overlap: TE's userbuffers GEMMs (megatron-core passes ub_overlap_* to TE's
    linears). They exist only on a CUDA GPU with Transformer Engine, and the overlap relies on
    the communication kernels being queued behind the GEMMs in order: CUDA_DEVICE_MAX_CONNECTIONS=1,
    which must be in the environment before CUDA starts (the slurm script exports it)."""
    environ = os.environ if environ is None else environ
    if not cuda:
        raise ConfigError("--tp-comm-overlap needs a CUDA GPU (Transformer Engine's userbuffers); "
                          "this machine has none")
    if backend != "te":
        raise ConfigError(f"--tp-comm-overlap needs Transformer Engine layers (--transformer-impl te; "
                          f"got {backend!r}, transformer_engine importable: {te_available()})")
    if environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
        raise ConfigError(
            "--tp-comm-overlap needs CUDA_DEVICE_MAX_CONNECTIONS=1 in the environment of every rank "
            f"(got {environ.get('CUDA_DEVICE_MAX_CONNECTIONS')!r}); export it before the launch")


_USERBUFFERS = None  # the shape TE's userbuffers were set up for, once per process


def initialize_userbuffers(train: TrainConfig, config: LM2Config) -> None:
    """TE's userbuffers for --tp-comm-overlap, before any TE layer is built: one communicator
    set over the TP group, sized for a micro-batch's full-sequence activations [s*b, h] (what
    the overlapped all-gather produces and the reduce-scatter consumes)."""
    global _USERBUFFERS
    import inspect

    from transformer_engine.pytorch.module.base import initialize_ub

    shape = [config.seq_length * train.micro_batch_size, config.hidden_size]
    if _USERBUFFERS is not None:
        if _USERBUFFERS != shape:
            raise ConfigError(f"--tp-comm-overlap: userbuffers are set up for {_USERBUFFERS} in this "
                              f"process, not {shape}")
        return
    kwargs = dict(shape=shape, tp_size=train.tensor_model_parallel_size, use_fp8=bool(config.fp8))
    if "dtype" in inspect.signature(initialize_ub).parameters:
        kwargs["dtype"] = config.params_dtype
    initialize_ub(**kwargs)
    _USERBUFFERS = shape


# Fusions megatron-core may refuse for this machine (e.g. fused RoPE needs a TE with it), the
# most optional first: under --fused-kernels auto they are dropped one by one until it accepts.
_OPTIONAL_FUSIONS = ("apply_rope_fusion", "cross_entropy_loss_fusion", "masked_softmax_fusion",
                     "bias_dropout_fusion", "bias_activation_fusion")


def apply_runtime_settings(config: LM2Config, settings: dict, strict: bool = False) -> dict:
    """Set the runtime fields on the run's config in place (the trainer, the schedules and the
    models share that object), validated first by building a copy with them. Returns the fields
    set. strict (--fused-kernels on): a refused fusion is an error instead of dropped."""
    model = dict(settings["model"])
    optional = [name for name in _OPTIONAL_FUSIONS if model.get(name)]
    while True:
        try:
            config.replace(**model)  # LM2Config/TransformerConfig checks
            break
        except (ValueError, AssertionError, ImportError) as error:
            if strict or not optional:
                raise ConfigError(f"runtime settings {model}: {error}") from None
            model[optional.pop(0)] = False
    for name, value in model.items():
        setattr(config, name, value)
    return model


def build_model_chunks(train: TrainConfig, config: LM2Config) -> List[DistributedDataParallel]:
    """This rank's model chunks (one per virtual pipeline stage), on its device, DDP-wrapped.
    First sets the runtime fields for this machine on `config` (apply_runtime_settings; the
    modules read them when built). The schedule's fields come after, from the wrapped chunks:
    call set_schedule_hooks(config, model_chunks) before running a schedule."""
    backend = transformer_backend(train)
    settings = runtime_settings(train, backend, cuda_available(), apex_wgrad=apex_wgrad_available(),
                                apex_softmax=apex_softmax_available())
    apply_runtime_settings(config, settings, strict=train.fused_kernels == "on")
    if settings["model"].get("tp_comm_overlap"):
        initialize_userbuffers(train, config)
    vpp = train.virtual_pipeline_size()
    if vpp:
        model_chunks = [build_model(config, backend, vp_stage=i) for i in range(vpp)]
    else:
        model_chunks = [build_model(config, backend)]
    if cuda_available():
        model_chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in model_chunks]
    if config.bf16 or config.fp16:
        model_chunks = [Float16Module(config, chunk) for chunk in model_chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=settings["ddp"]["overlap_grad_reduce"],
        overlap_param_gather=settings["ddp"]["overlap_param_gather"],
        use_distributed_optimizer=True,
        check_for_nan_in_grad=False,  # the trainer skips such steps itself (and counts them)
    )
    wrapped = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk buckets: with interleaving the others sync in one go.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(model_chunks)
    ]
    if ddp_config.overlap_param_gather:
        for chunk in wrapped:
            _sync_params_before_reading_weights(chunk)
    return wrapped


def set_schedule_hooks(config: LM2Config, model_chunks: List[DistributedDataParallel]) -> None:
    """The model-config fields Megatron's forward_backward schedules read, set from the wrapped
    model chunks (the config is the one the chunks were built with, shared by reference):

      no_sync_func               DDP's no_sync, so gradients sync once per step, not per micro-batch
      grad_sync_func             with --overlap-grad-reduce: start each chunk's reduce-scatter as
                                 soon as its backward is done
      finalize_model_grads_func  Megatron's finalize_model_grads: the DP reduction, the tied
                                 embedding's all-reduce across PP, the division by the token count
      calculate_per_token_loss   losses are token sums divided once by the global token count, so
                                 DP and micro-batch splits give the same gradient
    One function per field for interleaved pipelines (a list over chunks), else the function."""
    single = len(model_chunks) == 1
    no_sync = [chunk.no_sync for chunk in model_chunks]
    config.no_sync_func = no_sync[0] if single else no_sync
    if model_chunks[0].ddp_config.overlap_grad_reduce:
        grad_sync = [chunk.start_grad_sync for chunk in model_chunks]
        config.grad_sync_func = grad_sync[0] if single else grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.calculate_per_token_loss = True


def _sync_params_before_reading_weights(chunk: DistributedDataParallel) -> None:
    """With the parameter all-gather overlapped, the model's weights are stale between
    optimizer.step() and the next forward's pre-hooks; a checkpoint or export taken there would
    save the previous step's weights. Reading the model's state first finishes the gather
    (what Megatron-LM's disable_forward_pre_hook(param_sync=True) does before saving)."""
    inner = chunk.module
    while hasattr(inner, "module") and not hasattr(inner, "decoder"):
        inner = inner.module  # Float16Module -> GPTModel
    for name in ("sharded_state_dict", "state_dict"):
        original = getattr(inner, name)

        def synced(*args, _original=original, **kwargs):
            chunk.start_param_sync(force_sync=True)
            return _original(*args, **kwargs)

        setattr(inner, name, synced)


def no_weight_decay(param: torch.nn.Parameter, name: str) -> bool:
    return param.dim() == 1 or name.endswith(".bias") or name.endswith("initial_bank")


def build_optimizer(train: TrainConfig, config: LM2Config, model_chunks) -> tuple:
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=True,
    )
    overrides = {
        ParamKey(with_name_predicate=ParamWithNamePredicate("lm2_no_decay", no_weight_decay)):
            ParamGroupOverride(wd_mult=0.0)
    }
    optimizer = get_megatron_optimizer(optimizer_config, model_chunks, config_overrides=overrides)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_iters,
        lr_decay_steps=train.lr_decay_iters or train.train_iters,
        lr_decay_style=train.lr_decay_style,
        wsd_decay_steps=train.wsd_decay_iters(),
        lr_wsd_decay_style=train.lr_wsd_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
