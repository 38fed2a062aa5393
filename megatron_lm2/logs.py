"""Logging for the trainer and the training CLI: the `megatron_lm2` logger tree, to stdout, the
plain message (the step line and the other lines users and tests read look exactly as
`print` wrote them), from global rank 0 only.

    from megatron_lm2.logs import get_logger, setup_logging

    setup_logging(rank)              # once the process knows its rank (the trainer does it)
    log = get_logger(__name__)       # megatron_lm2.training.trainer
    log.info("saved ...")            # -> "saved ..." on rank 0's stdout
    log.warning("checkpoint ...")    # -> "WARNING: checkpoint ..."

The CLIs' results (lm2-eval tables, lm2-convert and lm2-preprocess summaries, the dry run's
plan) are printed: they are the command's output, not a log.
"""

from __future__ import annotations

import logging
import sys

ROOT = "megatron_lm2"


class _Stdout(logging.StreamHandler):
    """Writes to the sys.stdout of the moment (a redirected stream, pytest's capture), not the
    one there was when logging was set up; flushed after every record, as print(flush=True)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property wins
        pass


class _Plain(logging.Formatter):
    """The message alone; warnings and errors keep their level in front ("WARNING: ...")."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"{record.levelname}: {message}" if record.levelno >= logging.WARNING else message


class RankZero(logging.Filter):
    """Passes records on global rank 0 only: every rank logs the same lines."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0


def setup_logging(rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Route the `megatron_lm2` loggers to stdout, rank 0 only. Calling it again (a second
    trainer in one process) replaces the handler it added before; other handlers stay."""
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        if isinstance(handler, _Stdout):
            logger.removeHandler(handler)
    handler = _Stdout()
    handler.setFormatter(_Plain("%(message)s"))
    handler.addFilter(RankZero(rank))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # not also through the root logger (megatron-core's, pytest's)
    return logger


def get_logger(name: str) -> logging.Logger:
    """A logger under `megatron_lm2` (pass __name__)."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")
