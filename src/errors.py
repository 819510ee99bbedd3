"""User-facing errors and the entry-point wrapper that turns them into one line and exit code 2."""
from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Something the user can fix: a bad path, value, checkpoint or device. Message: 'what (how to fix)'."""


_SHOW_TRACEBACKS = False


def show_tracebacks(on: bool) -> None:
    """Set by the config parser from --debug (Config.debug is the one source of truth)."""
    global _SHOW_TRACEBACKS
    _SHOW_TRACEBACKS = bool(on)


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point; user errors end with `error: ...` on stderr and exit code 2, no traceback.

    `--debug` (or a config with debug: True) shows the traceback as well.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    show_tracebacks(False)
    try:
        return main(argv) or 0
    except UserError as exc:
        if _SHOW_TRACEBACKS:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (outputs written so far are complete; resume with --resume_ckpt)",
              file=sys.stderr)
        return 130
