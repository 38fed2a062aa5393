"""The training loop.

    Trainer(parse_args([...])).run()
    Trainer(train_config, model_config, source).run()   # lm2-train: data and model config resolved first

Set-up, in order: the parallel state; the data source (data.resolve_source) and from it the
model config (data.model_config_for), unless given; the model chunks (pipeline chunks,
build.build_model_chunks) and the schedule's fields on the model config
(build.set_schedule_hooks); optimizer and LR schedule; resume; datasets. The model builds its
own attention mask (megatron_lm2.model.LM2GPTModel); the trainer passes none.

One step = `num_microbatches` micro-batches per data-parallel rank through Megatron's pipeline
schedule (no pipelining, 1F1B, or interleaved 1F1B), losses summed over tokens and divided by
the global token count, a NaN/Inf check on loss and gradients, then the distributed optimizer
and the LR schedule, then a check that every parameter is still finite (one reduction per DDP
parameter buffer and one scalar to the host). A step whose loss or gradients are not finite is
skipped (weights untouched); an update that leaves a non-finite weight halts the run at once,
before anything is saved: checkpoints only ever hold finite weights, and one saved while
steps were being skipped is recorded as not known-good (docs/training.md, "Faults").

Memory banks: every forward starts from M_0 (LM2Memory's default when not carrying), so a step
depends on nothing but weights, optimizer state and its batch, and resuming needs no bank state.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from functools import partial
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_lm2 import distributed
from megatron_lm2.accounting import executed_attention_kernel, flops_per_token, num_parameters
from megatron_lm2.cli_errors import UserInputError
from megatron_lm2.compat import device
from megatron_lm2.config import ConfigError, LM2Config
from megatron_lm2.logs import get_logger, setup_logging
from megatron_lm2.memory_state import gate_stats, record_gate_stats
from megatron_lm2.training import checkpoint, data, metrics
from megatron_lm2.training.profiling import StepProfiler
from megatron_lm2.training.build import (
    build_model_chunks,
    build_optimizer,
    set_schedule_hooks,
    transformer_backend,
)
from megatron_lm2.training.config import TrainConfig
from megatron_lm2.training.divergence import DivergenceGuard
from megatron_lm2.training.integrity import CheckpointError
from megatron_lm2.folder_lock import FolderLockError, lock_on_rank0
from megatron_lm2.training.signals import ExitSignal, all_ranks

log = get_logger(__name__)


class TrainingHalted(UserInputError):
    """Too many consecutive non-finite steps, or an update that made a weight non-finite. The
    message names the checkpoint to restart from (the newest known-good one)."""


class Trainer:
    def __init__(self, train_config: TrainConfig, model_config: Optional[LM2Config] = None,
                 source: Optional[data.DataSource] = None):
        """`model_config` and `source` as lm2-train resolves them (data.resolve_source, then
        data.model_config_for); both left out, the trainer resolves them the same way."""
        if (model_config is None) != (source is None):
            raise ValueError("give both model_config and source (data.model_config_for), or neither")
        self.train_config = train = train_config
        self.rank, self.world_size = distributed.initialize(
            train.tensor_model_parallel_size, train.pipeline_model_parallel_size,
            train.virtual_pipeline_size(), seed=train.seed)
        setup_logging(self.rank)
        _check_parallel_state(train)
        # One writer per --save, taken before anything is built (folder_lock.py).
        self.folder_lock = (lock_on_rank0(train.save, "lm2-train", "--save", self.rank, _broadcast_from_rank0,
                                          log.warning) if train.save else None)
        self.dp_size = train.data_parallel_size(self.world_size)
        self.num_microbatches = train.num_microbatches(self.world_size)

        if source is None:
            source = data.resolve_source(train)
            model_config = data.model_config_for(train, source)
        self.source, self.model_config = source, model_config
        self.seq_length = self.model_config.seq_length

        self.model_chunks = build_model_chunks(train, self.model_config)
        set_schedule_hooks(self.model_config, self.model_chunks)
        self.optimizer, self.scheduler = build_optimizer(train, self.model_config, self.model_chunks)
        self.forward_backward = get_forward_backward_func()
        self._by_memory_chunk = False  # loss_func also reports per-memory-chunk sums (validation)

        self.step = 0
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.resumed_from: Optional[str] = None
        self._unconfirmed: Optional[str] = None  # the checkpoint the next step confirms or demotes
        self.divergence = DivergenceGuard(loss_factor=train_config.divergence_loss_factor,
                                          loss_patience=train_config.divergence_loss_steps,
                                          max_weight_rms=train_config.max_weight_rms)
        self._maybe_resume()

        self.train_set, self.valid_set = data.build_datasets(train, self.source, self.seq_length)
        self.train_iterators = self._iterators(self.train_set, self.consumed_samples)

        # FLOPs as the kernels execute them: flash attention skips the masked half of the causal
        # scores, the unfused CPU path computes them all (accounting.executed_attention_kernel).
        self.flops_per_token = flops_per_token(
            self.model_config, micro_batch_size=train.micro_batch_size,
            kernel=executed_attention_kernel(transformer_backend(train), torch.cuda.is_available(), self.model_config))
        self.peak = metrics.peak_tflops(
            metrics.device_name(), "fp8" if train.fp8_format else ("bf16" if train.bf16 else "fp32"))
        self.writer = None
        if self.rank == 0:
            tensorboard = train.tensorboard_dir or (os.path.join(train.save, "tensorboard") if train.save else None)
            metrics_file = train.metrics_file or (os.path.join(train.save, "metrics.jsonl") if train.save else None)
            self.writer = metrics.MetricsWriter(tensorboard, metrics_file, train.wandb_project,
                                                train.wandb_run_name, train.to_dict(),
                                                resumed_at=self.step if self.resumed_from else None)
        self.signals = ExitSignal(enabled=not train.no_save_on_signal)
        self.history: List[dict] = []  # per-step records (tests and plots read them)
        self.profiler = StepProfiler(train, self.rank)  # --profile-steps

    # ------------------------------------------------------------------------ set-up
    def _iterators(self, dataset, consumed: int):
        dp_rank = parallel_state.get_data_parallel_rank()
        count = len(self.model_chunks)  # interleaving: one iterator per model chunk, same order
        return [data.micro_batches(dataset, consumed, self.train_config.micro_batch_size, dp_rank, self.dp_size,
                                   self.train_config.num_workers) if self.train_config.dataloader == "megatron"
                else _dali_batches(dataset, consumed, self.train_config, dp_rank, self.dp_size)
                for _ in range(count)]

    def _maybe_resume(self) -> None:
        path = checkpoint.latest_checkpoint(self.train_config.checkpoint_dir())
        if path is None:
            if self.train_config.load:
                raise ConfigError(f"--load {self.train_config.load}: no checkpoint there (no 'latest' file)")
            if self.train_config.init_from:
                self._init_weights(self.train_config.init_from)
            return
        state, path = self._load_with_fallback(path)
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.resumed_from = path
        if self.train_config.save and os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.train_config.save):
            self._unconfirmed = path
        if checkpoint.integrity.known_good(path) is False:
            log.warning(f"{path} is recorded as not known-good (saved while steps were being "
                        f"skipped); --load-fallback resumes from the newest known-good one instead")
        log.info(f"resumed from {path} at step {self.step} ({self.consumed_samples} samples consumed)"
                 + (f"; resharded from {state['saved_layout']}" if state["resharded"] else ""))

    def _load_with_fallback(self, path: str):
        """Load `path`; with --load-fallback, a damaged or not-known-good checkpoint of a run
        directory gives way to the newest older known-good one (the damaged one is renamed
        damaged-iter_N and `latest` re-pointed, so a restart cannot pick it again)."""
        directory = os.path.dirname(path)
        fallback = self.train_config.load_fallback and checkpoint.step_of(path) is not None
        while True:
            problem = None
            if fallback and checkpoint.integrity.known_good(path) is False:
                problem = f"{path} is recorded as not known-good (saved while steps were being skipped)"
            else:
                try:
                    return checkpoint.load_checkpoint(
                        path, self.model_chunks, self.optimizer, self.scheduler,
                        allow_unverified=self.train_config.allow_unverified_checkpoint), path
                except CheckpointError as error:
                    if not fallback:
                        older = checkpoint.newest_known_good(directory, below=checkpoint.step_of(path))
                        hint = (f"; pass --load-fallback to resume from {older} instead" if older
                                else "")
                        raise CheckpointError(f"{error}{hint}") from None
                    problem = str(error)
            older = checkpoint.newest_known_good(directory, below=checkpoint.step_of(path))
            if older is None:
                raise CheckpointError(f"{problem}; --load-fallback: no older known-good checkpoint in {directory}")
            log.warning(f"{problem}; falling back to {older}")
            if self.rank == 0:
                if checkpoint.integrity.known_good(path) is not False:
                    log.info(f"moved the damaged checkpoint to {checkpoint.set_aside(path)}")
                checkpoint.point_latest_at(older)
            if dist.is_initialized():
                dist.barrier()
            path = older

    def _init_weights(self, directory: str) -> None:
        path = checkpoint.latest_checkpoint(directory)
        if path is None:
            raise ConfigError(f"--init-from {directory}: not a dist checkpoint (no metadata.json) and no "
                              f"'latest' file naming one")
        checkpoint.load_weights(path, self.model_chunks,
                                allow_unverified=self.train_config.allow_unverified_checkpoint)
        self.optimizer.reload_model_params()  # bf16: the fp32 main weights follow the loaded ones
        log.info(f"initialised weights from {path} (fresh optimizer, step 0)")

    # ------------------------------------------------------------------------- steps
    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        dev = device()
        tokens = batch["tokens"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        loss_mask = batch["loss_mask"].to(dev, non_blocking=True)
        position_ids = batch["position_ids"].to(dev, non_blocking=True)
        output = model(tokens, position_ids, None, labels=labels)  # the model builds its mask
        return output, partial(self.loss_func, loss_mask)

    def loss_func(self, loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
        """Sum of the token losses and the token count: the schedule sums these over micro-batches
        and finalize_model_grads divides the gradients by the global token count."""
        mask = loss_mask.reshape(-1).float()
        loss_sum = torch.sum(per_token_loss.reshape(-1).float() * mask)
        num_tokens = mask.sum().to(torch.int)
        report = {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}
        if self._by_memory_chunk:
            report["memory chunk loss"] = self._memory_chunk_report(per_token_loss.detach(), loss_mask)
        return loss_sum, num_tokens, report

    def _memory_chunk_report(self, per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """[2, memory chunks]: summed loss and token count of the positions in memory chunk 0,
        1, ... of each sequence (memory_chunk_size tokens, the unit the bank is written in)."""
        size = self.model_config.memory_chunk_size
        mask = loss_mask.reshape(-1, self.seq_length // size, size).float()
        loss = per_token_loss.reshape(mask.shape).float() * mask
        return torch.stack([loss.sum(dim=(0, 2)), mask.sum(dim=(0, 2))])

    def _reduce(self, losses, key: str, shape) -> torch.Tensor:
        """Sum of the reports `key` over micro-batches, DP ranks and (from the last stage) the
        pipeline, in float64, known on every rank."""
        total = torch.zeros(shape, dtype=torch.float64, device=device())
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for item in losses:
                total += item[key].to(torch.float64)
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        return total

    def _reduce_loss(self, losses) -> float:
        """Mean token loss of the global batch, known on every rank."""
        total = self._reduce(losses, "lm loss", 2)
        return (total[0] / total[1].clamp(min=1)).item()

    def _grads_finite(self) -> bool:
        """One check per DDP gradient buffer and a single host sync (not one per parameter)."""
        checks = [torch.isfinite(buffer.grad_data).all()
                  for model_chunk in self.model_chunks
                  for buffer in model_chunk.buffers + model_chunk.expert_parallel_buffers]
        return bool(torch.stack(checks).all()) if checks else True

    def _params_finite(self) -> torch.Tensor:
        """A 0-d bool tensor, not synced: every weight of this rank is finite. One fp32 sum per
        DDP parameter buffer (a NaN or Inf anywhere makes the sum non-finite; a finite sum can
        only overflow when weights are ~1e30, which is broken too)."""
        sums = []
        for model_chunk in self.model_chunks:
            for buffer in model_chunk.buffers + model_chunk.expert_parallel_buffers:
                if buffer.param_data is not None:
                    sums.append(torch.sum(buffer.param_data, dtype=torch.float32))
                else:
                    sums.extend(torch.sum(p, dtype=torch.float32) for p in buffer.params)
        if not sums:
            return torch.tensor(True, device=device())
        return torch.isfinite(torch.stack(sums)).all()

    def _weight_rms(self) -> Optional[float]:
        """RMS over every weight (all ranks; DP replicas count alike, so the ratio is unchanged):
        one fp32 sum of squares per DDP buffer and one all-reduce. None when the guard is off."""
        if self.train_config.max_weight_rms <= 0:
            return None
        total = torch.zeros(2, dtype=torch.float64, device=device())
        for model_chunk in self.model_chunks:
            for buffer in model_chunk.buffers + model_chunk.expert_parallel_buffers:
                tensors = [buffer.param_data] if buffer.param_data is not None else buffer.params
                for tensor in tensors:
                    total[0] += torch.sum(tensor.detach().double() ** 2)
                    total[1] += tensor.numel()
        if dist.is_initialized():
            dist.all_reduce(total)
        return math.sqrt(total[0].item() / max(total[1].item(), 1.0))

    def _check_divergence(self, record: dict) -> None:
        """Halt before anything is saved once the guard's verdict is in (divergence.py)."""
        if record["skipped"]:
            return
        verdict = self.divergence.observe(record["loss"], self._weight_rms())
        if verdict:
            raise TrainingHalted(self._halt_message(f"the run diverged at step {self.step}: {verdict}")
                                 + "Lower --lr / --weight-decay, or loosen the guard (--max-weight-rms, "
                                   "--divergence-loss-factor, --divergence-loss-steps; 0 = off).")

    def _halt_message(self, what: str) -> str:
        if not self.train_config.save:
            where = "no checkpoints were saved (no --save). "
        else:
            good = checkpoint.newest_known_good(self.train_config.save)
            where = (f"the newest known-good checkpoint is {good} (resume with --load {good}). " if good
                     else f"no known-good checkpoint in {self.train_config.save}. ")
        return f"halting at step {self.step}: {what}; {where}"

    def train_step(self) -> dict:
        for model_chunk in self.model_chunks:
            model_chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.forward_backward(
            forward_step_func=self.forward_step,
            data_iterator=self.train_iterators,
            model=self.model_chunks,
            num_microbatches=self.num_microbatches,
            seq_length=self.seq_length,
            micro_batch_size=self.train_config.micro_batch_size,
            forward_only=False,
        )
        loss = self._reduce_loss(losses)
        finite = all_ranks(math.isfinite(loss) and self._grads_finite())
        grad_norm = None
        if finite:
            updated, grad_norm, _ = self.optimizer.step()
            finite = bool(updated)
            if finite and not all_ranks(self._params_finite()):
                # Not rolled back: that would need a copy of weights and optimizer state every
                # step; nothing after this point is saved.
                raise TrainingHalted(self._halt_message(
                    f"the update of step {self.step + 1} made weights non-finite (loss {loss}, "
                    f"grad norm {grad_norm}, lr {self._lr():.3g}); nothing was saved after it")
                    + "Lower --lr or --clip-grad.")
        if finite:
            self.scheduler.step(increment=1)
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        return dict(loss=loss, grad_norm=None if grad_norm is None else float(grad_norm), skipped=not finite)

    def evaluate(self) -> float:
        return self.evaluation()["loss"]

    def evaluation(self) -> dict:
        """Validation on the first --eval-iters global batches of the validation split:
        `loss` (mean of the batches' mean token losses) and `loss_by_chunk` (mean token loss
        of positions in memory chunk 0, 1, ..., over all of those tokens)."""
        dp_rank = parallel_state.get_data_parallel_rank()
        iterators = [data.micro_batches(self.valid_set, 0, self.train_config.micro_batch_size, dp_rank, self.dp_size)
                     for _ in self.model_chunks]
        for model_chunk in self.model_chunks:
            model_chunk.eval()
        memory_chunks = self.seq_length // self.model_config.memory_chunk_size
        total, by_chunk = 0.0, torch.zeros(2, memory_chunks, dtype=torch.float64, device=device())
        self._by_memory_chunk = True
        try:
            with torch.no_grad():
                for _ in range(self.train_config.eval_iters):
                    losses = self.forward_backward(
                        forward_step_func=self.forward_step, data_iterator=iterators, model=self.model_chunks,
                        num_microbatches=self.num_microbatches, seq_length=self.seq_length,
                        micro_batch_size=self.train_config.micro_batch_size, forward_only=True)
                    total += self._reduce_loss(losses)
                    by_chunk += self._reduce(losses, "memory chunk loss", (2, memory_chunks))
        finally:
            self._by_memory_chunk = False
            for model_chunk in self.model_chunks:
                model_chunk.train()
        means = (by_chunk[0] / by_chunk[1].clamp(min=1)).tolist()
        return dict(loss=total / self.train_config.eval_iters, loss_by_chunk=means)

    # -------------------------------------------------------------------------- loop
    def run(self) -> List[dict]:
        train = self.train_config
        log.info(self.banner())
        interval_time, interval_steps = 0.0, 0
        start_step = self.step
        run_start = time.perf_counter()
        saved_step = self.step if self.resumed_from else None
        gc_was_enabled = gc.isenabled()
        if train.manual_gc_interval:
            # --manual-gc-interval: every rank collects at the same steps (below), none on its own.
            gc.disable()
            gc.collect()
        try:
            while self.step < train.train_iters:
                started = time.perf_counter()
                logged = (self.step + 1) % train.log_interval == 0 or self.step + 1 == train.train_iters
                # Gate statistics cost a reduction per gate: only on the steps the log shows.
                self.profiler.before_step(self.step + 1)
                with record_gate_stats(self.model_chunks) if logged else contextlib.nullcontext():
                    result = self.train_step()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - started
                self.profiler.after_step(self.step + 1)  # after the timing: writing is not the step
                self.step += 1
                self.consumed_samples += train.global_batch_size
                if train.manual_gc_interval and self.step % train.manual_gc_interval == 0:
                    gc.collect()  # after the step's timing: the log shows step time, not GC
                interval_time += elapsed
                interval_steps += 1
                record = dict(step=self.step, loss=result["loss"], grad_norm=result["grad_norm"],
                              lr=self._lr(), skipped=result["skipped"])
                self._confirm_last_save(result["skipped"])
                self.history.append(record)
                self._check_divergence(record)
                if self.consecutive_skips >= train.max_skipped_steps:
                    raise TrainingHalted(self._halt_message(
                        f"{self.consecutive_skips} steps in a row had a NaN/Inf loss or gradient "
                        f"(loss {result['loss']})")
                        + "Lower --lr, check the data, or raise --max-skipped-steps.")
                if logged:
                    self._log_interval(record, interval_time, interval_steps, run_start, start_step)
                    interval_time, interval_steps = 0.0, 0
                if train.eval_interval and train.eval_iters and self.step % train.eval_interval == 0:
                    self._log_eval()
                signalled = self.signals.any_rank()
                exiting = signalled or (train.exit_interval and self.step % train.exit_interval == 0)
                if train.save and (exiting or (train.save_interval and self.step % train.save_interval == 0)
                                   or self.step == train.train_iters):
                    self.save()
                    saved_step = self.step
                if exiting:
                    log.info(f"exiting at step {self.step}: "
                             + (f"signal {self.signals.received or 'on another rank'}" if signalled
                                else f"--exit-interval {train.exit_interval}"))
                    break
            if train.save and saved_step != self.step:
                self.save()
        finally:
            if train.manual_gc_interval and gc_was_enabled:
                gc.enable()
            self.signals.restore()
            self.profiler.close()  # a run stopped inside the window still writes its trace
            if self.writer is not None:
                self.writer.close()
            self.close()
        return self.history

    def close(self) -> None:
        """Give the --save folder back (run() does; a trainer built and not run may call it)."""
        if self.folder_lock is not None:
            self.folder_lock.release()
            self.folder_lock = None

    def _confirm_last_save(self, skipped: bool) -> None:
        """The first step after a save (or resume) judges its weights: skipped -> demoted."""
        path, self._unconfirmed = self._unconfirmed, None
        if path is not None and skipped and self.rank == 0:
            checkpoint.integrity.demote(path, f"step {self.step}, the first after it, had a NaN/Inf "
                                              f"loss or gradient")

    def save(self) -> str:
        started = time.perf_counter()
        held = self.folder_lock.held() if self.folder_lock is not None else True
        if not all_ranks(held):
            if self.folder_lock is not None:
                self.folder_lock.check_held()  # rank 0: the line naming the new holder
            raise FolderLockError(f"{self.train_config.save}: this run's lock was taken over; stopping "
                                  f"without saving")
        finite = all_ranks(self._params_finite())
        if not finite:  # cannot happen after a checked update; loaded or initial weights may
            raise TrainingHalted(self._halt_message("the weights to be saved are not finite"))
        known_good = self.consecutive_skips == 0 and not self.divergence.suspicious
        reason = ("weights finite, last step not skipped" if known_good else
                  f"saved after {self.consecutive_skips} skipped step(s) in a row" if self.consecutive_skips
                  else f"saved while the loss was {self.divergence.streak} step(s) above the divergence "
                       f"guard's bound")
        path = checkpoint.save_checkpoint(
            self.train_config.save, self.step, self.model_chunks, self.optimizer, self.scheduler,
            dict(consumed_samples=self.consumed_samples, skipped_steps=self.skipped_steps),
            keep_last=self.train_config.keep_last, config=_plain(self.train_config.to_dict()),
            known_good=known_good, reason=reason)
        log.info(f"saved {path} ({time.perf_counter() - started:.1f}s)"
                 + ("" if known_good else f"; not known-good: {reason}"))
        self._unconfirmed = path if known_good else None
        return path

    # ------------------------------------------------------------------------ logging
    def _lr(self) -> float:
        for group in self.optimizer.param_groups:
            if group.get("default_config", True):
                return float(group["lr"])
        return float(self.optimizer.param_groups[0]["lr"])

    def _log_interval(self, record, seconds, steps, run_start, start_step) -> None:
        tokens = steps * self.train_config.global_batch_size * self.seq_length
        rates = metrics.throughput(tokens, seconds, self.world_size, self.flops_per_token, self.peak)
        # One gather for the gate statistics and each rank's step time (the straggler report).
        per_rank = [None] * self.world_size
        dist.all_gather_object(per_rank, (gate_stats(self.model_chunks), seconds / steps))
        gates = metrics.gate_groups(metrics.merge_gate_stats([stats for stats, _ in per_rank]))
        stragglers = metrics.straggler_stats([step_time for _, step_time in per_rank])
        done = self.step - start_step
        eta = (time.perf_counter() - run_start) / max(done, 1) * (self.train_config.train_iters - self.step)
        full = dict(record, train_iters=self.train_config.train_iters, skipped_steps=self.skipped_steps,
                    consumed_samples=self.consumed_samples, step_time=seconds / steps,
                    memory_gates=gates, **rates,
                    **{k: v for k, v in stragglers.items() if k != "step_time_median"})
        full.pop("skipped")
        if self.rank == 0:
            straggler = f" | {metrics.straggler_text(stragglers)}" if self.world_size > 1 else ""
            log.info(metrics.format_line(full) + straggler + f" | eta {_duration(eta)}")
            self.writer.write(full)

    def _log_eval(self) -> None:
        result = self.evaluation()
        loss = result["loss"]
        if self.rank == 0:
            by_chunk = " ".join(f"{x:.3f}" for x in result["loss_by_chunk"])
            log.info(f"validation step {self.step} | loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.2f} | "
                     f"by memory chunk {by_chunk}")
            # val_loss_by_chunk: read by the scaling study (issue 13); keep the name.
            self.writer.write(dict(step=self.step, loss=loss, val_loss_by_chunk=result["loss_by_chunk"]),
                              prefix="valid")

    def banner(self) -> str:
        c, t = self.model_config, self.train_config
        params = num_parameters(c)
        return (f"LM2 training: flavor {t.flavor} | {params.total / 1e6:.2f}M parameters "
                f"({params.memory / 1e6:.2f}M memory) | layers {c.num_layers} d {c.hidden_size} "
                f"seq {self.seq_length} memory chunk {c.memory_chunk_size} | TP {t.tensor_model_parallel_size} "
                f"PP {t.pipeline_model_parallel_size} DP {self.dp_size} | micro {t.micro_batch_size} x "
                f"{self.num_microbatches} microbatches, global {t.global_batch_size} | "
                f"{'bf16' if t.bf16 else 'fp32'}{' fp8-' + t.fp8_format if t.fp8_format else ''} | "
                f"{t.train_iters} steps from step {self.step} | data "
                f"{'mock' if self.source.blend is None else self.source.manifest}")


def _broadcast_from_rank0(value):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _check_parallel_state(train: TrainConfig) -> None:
    """Megatron's parallel state may have been set up before the trainer (tests, notebooks):
    it must be the layout the flags ask for."""
    vpp = train.virtual_pipeline_size()
    now = (parallel_state.get_tensor_model_parallel_world_size(),
           parallel_state.get_pipeline_model_parallel_world_size(),
           parallel_state.get_virtual_pipeline_model_parallel_world_size())
    wanted = (train.tensor_model_parallel_size, train.pipeline_model_parallel_size, vpp)
    if now != wanted:
        raise RuntimeError(f"Megatron's parallel state is TP/PP/VPP {now} but the flags ask for {wanted}; "
                           f"destroy it first (megatron.core.parallel_state.destroy_model_parallel)")


def _dali_batches(dataset, consumed, train, dp_rank, dp_size):
    from megatron_lm2.training.dali import dali_micro_batches

    return dali_micro_batches(dataset, consumed, train.micro_batch_size, dp_rank, dp_size, seed=train.seed)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _plain(values: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
