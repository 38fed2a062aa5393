"""argparse, ending a bad flag the way every `lm2-*` command ends bad input (cli_errors.py): one
line `prog: error: <what>` on stderr and exit code 2; no usage block (`--help` has it). And the
library notices a user cannot act on, silenced before megatron-core is imported.

    from megatron_lm2.cli_args import ArgumentParser, quiet_library_warnings
"""

from __future__ import annotations

import argparse
import sys
import warnings

from megatron_lm2.cli_errors import USAGE_EXIT_CODE, one_line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {one_line(message)} (see --help)\n")
        sys.exit(USAGE_EXIT_CODE)


def quiet_library_warnings() -> None:
    """Megatron-core warns on import, once per module, that Apex/TE are absent (expected on a
    CPU), and torch that calls Megatron makes are deprecated; they would bury the output (and a
    one-line error). Call before megatron-core is imported."""
    for message in (r".*(Apex|Transformer Engine).*not installed", r"full scope is deprecated",
                    r"`load_state_dict` is deprecated"):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed")
