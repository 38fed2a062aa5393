"""One way for every `lm2-*` command to end on bad input: a single line naming the flag, file or
row at fault, on stderr, and exit code 2 (argparse's own code for usage errors). A traceback
is for bugs, not for input: it is shown only with `--debug` or `LM2_DEBUG=1`.

An error is "user input" when its class derives from `UserInputError` (the project's own
error types do: ConfigError, CheckpointError, InputError, ...), or is one of the OS errors a
wrong path produces. Anything else is a bug and keeps its traceback.

    from megatron_lm2.cli_errors import cli_entry

    @cli_entry("lm2-convert")
    def main(argv=None) -> int: ...
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Optional, Sequence

USAGE_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class UserInputError(ValueError):
    """Base of every error that bad input (a flag, a file, a row) causes. Its message must name
    the flag, file or row and say what is wrong, in one line."""


# Wrong paths and permissions: their str() already names the file.
_OS_INPUT_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def debug_requested(argv: Optional[Sequence[str]]) -> bool:
    return os.environ.get("LM2_DEBUG", "") not in ("", "0") or "--debug" in (argv or ())


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def cli_entry(prog: str) -> Callable:
    """Wrap a `main(argv) -> int` so user-input errors print `prog: error: <one line>` and exit 2.
    `--debug` is removed from argv before `main` sees it (every CLI accepts it)."""

    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(argv: Optional[Sequence[str]] = None):
            args = list(sys.argv[1:] if argv is None else argv)
            debug = debug_requested(args)
            args = [a for a in args if a != "--debug"]
            try:
                return main(args)
            except (UserInputError, *_OS_INPUT_ERRORS) as error:
                if debug:
                    raise
                print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
                return USAGE_EXIT_CODE
            except KeyboardInterrupt:  # Ctrl-C where no handler saves first (lm2-train's does)
                if debug:
                    raise
                print(f"{prog}: interrupted", file=sys.stderr)
                return INTERRUPTED_EXIT_CODE

        return run

    return wrap

