"""Run Megatron-core on a CPU-only machine (gloo), and only there.

Megatron-core assumes CUDA: it asks for `torch.cuda.current_device()`, seeds the CUDA RNG,
allocates buffers with `device="cuda"` and checks `tensor.type() == "torch.cuda.FloatTensor"`.
`enable_cpu_compat()` redirects exactly those calls to the CPU. It does nothing when CUDA is
available, so it can never change behaviour on a GPU machine. Each patch names the
Megatron-core call that needs it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sys

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_enabled = False

# The megatron-core releases these patches (and training/checkpoint.py's optimizer-loading
# fixes) were written for: [low, high). CI tests 0.16.1; the CPU recipes were also checked on
# 0.19.2. setup.py's requirement says the same (tests/test_compat.py holds them together).
MEGATRON_CORE_RANGE = ("0.16.1", "0.20")


class UnsupportedMegatronCore(RuntimeError):
    pass


def check_megatron_core_version(version: str | None = None) -> str:
    """Refuse a megatron-core these patches were not written for: they replace internals
    (RNG getters, reduce-scatter, the distributed optimizer's state loader) by name, and a
    release that moved them would fail in ways far from the cause."""
    from packaging.version import Version

    if version is None:
        from megatron.core import package_info

        version = package_info.__version__
    low, high = MEGATRON_CORE_RANGE
    if not Version(low) <= Version(version) < Version(high):
        raise UnsupportedMegatronCore(
            f"megatron-core {version} is not supported: megatron_lm2/compat.py patches "
            f"megatron-core internals written for >={low},<{high}; install "
            f"'megatron-core>={low},<{high}' (constraints.txt pins the tested release)"
        )
    return version


# Transformer Engine releases megatron-core 0.16.1 is written against (its TE extension's
# version gates); setup.py's gpu extra requires the same range (tests/test_compat.py).
TRANSFORMER_ENGINE_RANGE = ("2.9", "2.12")


def transformer_engine_version_problem(version: str) -> str | None:
    """None when this Transformer Engine release is in TRANSFORMER_ENGINE_RANGE, else the one
    line to warn with. Release numbers only: a 2.12 dev or local build counts as 2.12."""
    from packaging.version import InvalidVersion, Version

    low, high = TRANSFORMER_ENGINE_RANGE
    try:
        release = Version(version).release
    except InvalidVersion:
        release = None
    if release is not None and Version(low).release <= release < Version(high).release:
        return None
    return (f"transformer-engine {version} is outside the range megatron-core 0.16.1 supports "
            f"(>={low},<{high}); FP8 and the TE layers may fail or differ: install "
            f"'transformer-engine[pytorch]>={low},<{high}'")


def warn_if_unsupported_transformer_engine() -> str | None:
    """Logs one warning line when the installed Transformer Engine is outside the supported
    range (it is not refused: a newer TE often works); returns the line, or None."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        import transformer_engine

        installed = getattr(transformer_engine, "__version__", None)
        if installed is None:
            try:
                installed = version("transformer-engine")
            except PackageNotFoundError:
                return None
    except Exception:  # noqa: BLE001 - the import failure is reported where TE is needed
        return None
    problem = transformer_engine_version_problem(str(installed))
    if problem:
        logging.getLogger("megatron_lm2").warning(problem)
    return problem


def cuda_available() -> bool:
    return torch.cuda.is_available()


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: DDP grad sync (param_and_grad_buffer) and the
    pipeline p2p code call `torch.cuda.current_stream()`, `.wait_stream()`, `.record()`."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def query(self):
        return True


def _to_cpu_device(device):
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites literal CUDA devices in tensor factories and `.to()`: schedules.py
    (`torch.zeros([], device="cuda")` for the loss), optimizer/clip_grads.py and
    grad_scaler.py (`device="cuda"` buffers) and dist_checkpointing's exchange buffers."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if (
            func is torch.Tensor.to
            and len(args) > 1
            and isinstance(args[1], (str, torch.device, int))
            and not isinstance(args[1], bool)
        ):
            args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


def _reduce_scatter_via_all_reduce(output, input_, group=None, async_op=False):
    import torch.distributed as dist

    total = input_.clone()
    dist.all_reduce(total, group=group)
    rank = dist.get_rank(group)
    output.copy_(total.chunk(dist.get_world_size(group), dim=0)[rank])
    return None


def enable_cpu_compat() -> bool:
    """Install the CPU patches if CUDA is absent. Idempotent. Returns True if installed."""
    global _enabled
    if _enabled:
        return True
    if cuda_available():
        return False
    check_megatron_core_version()

    # ~175 `device=torch.cuda.current_device()` sites (embeddings, linear layers, DDP buffers).
    torch.cuda.current_device = lambda: _CPU
    # CudaRNGStatesTracker.add / model_parallel_cuda_manual_seed read and set the CUDA RNG.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    # Timers, the optimizer and checkpointing synchronize; streams come from DDP and p2p.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NoOpStream()
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpStream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    # `.cuda()` on batches and on the distributed optimizer's buffers.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # clip_grads asserts `grad.type() == "torch.cuda.FloatTensor"`; the Float16 and distributed
    # optimizers dispatch on the same strings.
    original_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            if self.device.type == "cpu" and "cuda" not in name:
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type

    # tensor_parallel.random keeps its own references to the CUDA RNG getters/setters.
    import megatron.core.tensor_parallel.random as mcore_random

    mcore_random._get_cuda_rng_state = (
        lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    )
    # Autograd runs a custom Function's backward outside the mode below, and megatron-core's
    # activation recompute (CheckpointFunction: --recompute-granularity) re-runs forwards there,
    # which build tensors on "cuda" (the causal softmax mask): recompute inside the mode too.
    checkpoint_backward = mcore_random.CheckpointFunction.backward

    def _recompute_on_cpu(ctx, *args):
        with _CudaToCpuMode():
            return checkpoint_backward(ctx, *args)

    mcore_random.CheckpointFunction.backward = staticmethod(_recompute_on_cpu)
    # gloo has no reduce_scatter; sequence parallelism's reduce-scatter (mappings.py, and the
    # weight-gradient path in layers.py) falls back to an all-reduce plus this rank's slice.
    import megatron.core.tensor_parallel.layers as mcore_layers
    import megatron.core.tensor_parallel.mappings as mcore_mappings

    mcore_mappings.dist_reduce_scatter_func = _reduce_scatter_via_all_reduce
    mcore_layers.dist_reduce_scatter_func = _reduce_scatter_via_all_reduce
    # fork() compares the CPU RNG before and after; with CUDA mapped onto it, it always warns.
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)

    # DDP reads `.grad` of non-leaf views through the mode above; torch warns about it once.
    import warnings

    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
    _CudaToCpuMode().__enter__()
    _enabled = True
    return True


def device() -> torch.device:
    """The device this process computes on: its local CUDA device, or the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return _CPU


# ------------------------------------------------------------------ megatron-core internals
# Patches that replace megatron-core internals by name, on every machine (not only the CPU).
# Each checks the release first (check_megatron_core_version).
_WRITER_MANAGER = None


def patch_torch_adam_loading(optimizer) -> None:
    """megatron-core 0.16 with torch's AdamW (no Apex/TE, i.e. on CPU): loading the distributed
    optimizer's parameter state copies every key of the live state (which holds torch's `step`)
    from the checkpoint's tensors, which carry no `step` (it is restored from the param groups
    just before), and fails with KeyError 'step'. Copy only the tensors the checkpoint has.
    GPU runs with TE's FusedAdam keep no per-parameter `step` and are left alone."""
    from megatron.core.optimizer import distrib_optimizer

    check_megatron_core_version()
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, distrib_optimizer.DistributedOptimizer):
            continue
        if inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue

        def set_states(model_param, tensors, inner=inner):
            group_index, group_order = inner.model_param_group_index_map[model_param]
            main_param = inner.optimizer.param_groups[group_index]["params"][group_order]
            state = inner.optimizer.state[main_param]
            for key, value in tensors.items():
                (main_param if key == "param" else state[key]).copy_(value)

        inner._set_main_param_and_optimizer_states = set_states


def checkpoint_writer_dies_with_us() -> None:
    """megatron-core 0.16's FileSystemWriterAsync (the torch_dist writer) starts a spawn-context
    multiprocessing Manager on a process's first save (filesystem_async._get_write_results_queue)
    and keeps it for the life of the process. It exits with a trainer that exits or is
    SIGTERMed, but a trainer killed with SIGKILL leaves it (and the resource tracker beside it)
    orphaned. Start that Manager ourselves, with PR_SET_PDEATHSIG (Linux), so that the kernel
    ends it with the trainer; and tie the writer processes it forks during a save to the trainer
    the same way (child_process.forks_die_with_us)."""
    global _WRITER_MANAGER
    check_megatron_core_version()
    if not sys.platform.startswith("linux"):
        return
    from megatron_lm2.child_process import forks_die_with_us

    forks_die_with_us()
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return  # already made, or a megatron-core without this global: left alone
    from multiprocessing.managers import SyncManager

    from megatron_lm2.child_process import die_with_parent

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=die_with_parent)  # stdlib-only module: the child imports no torch
    _WRITER_MANAGER = manager
    filesystem_async._results_queue = manager.Queue()
