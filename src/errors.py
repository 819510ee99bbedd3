"""User-facing errors and the entry-point wrapper that turns them into one line and exit code 2."""
from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path


class UserError(Exception):
    """Something the user can fix: a bad path, value, checkpoint or device. Message: 'what (how to fix)'."""


def writable_folder(path: Path, what: str, flag: str) -> None:
    """Create folder `path` (and parents) or raise UserError saying why it cannot be used and which flag to change."""
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{what} {path} cannot be created: {parent} is a file (pass another {flag})")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{what} {path} is not writable ({exc.strerror}; pass a writable {flag})") from None


class Interrupted(Exception):
    """Training stopped by Ctrl-C or a signal; the message says where and how to resume."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.signum = signum


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM (a scheduler or `kill`), handled like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def stop_on_signals() -> None:
    """SIGTERM (and SIGHUP) end the run like Ctrl-C: between steps, with a message and a non-zero exit."""
    def _raise(signum, frame):
        raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)


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
    except Interrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt as exc:
        print("error: interrupted (files written so far are complete)", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
