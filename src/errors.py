"""User-facing errors and the entry-point wrapper that turns them into one line and exit code 2."""
from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Something the user can fix: a bad path, value, checkpoint or device. Message: 'what (how to fix)'."""


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point; user errors end with `error: ...` on stderr and exit code 2, no traceback.

    `--debug True` on the command line shows the traceback as well.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        return main(argv) or 0
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (outputs written so far are complete; resume with --resume_ckpt)",
              file=sys.stderr)
        return 130


def _debug_requested(argv: Sequence[str]) -> bool:
    for i, arg in enumerate(argv):
        if arg == "--debug" and i + 1 < len(argv):
            return argv[i + 1].lower() in ("true", "1")
        if arg.startswith("--debug="):
            return arg.split("=", 1)[1].lower() in ("true", "1")
    return False
