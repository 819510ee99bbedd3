"""User-facing errors and the entry-point wrapper that turns them into one line and exit code 2."""
from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager
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


_held = False  # inside `signals_held_to_step_boundaries`: a signal waits for the end of the current step
_pending: int | None = None  # the signal that arrived while held


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT), SIGTERM (a scheduler or `kill`) and SIGHUP end the run with a message and a non-zero exit.

    Inside `signals_held_to_step_boundaries()` the first signal is held until the step (or the graph compile)
    in progress ends: raised in the middle of a compile it would make MindSpore log a page of errors and write
    `rank_0/om/analyze_fail.ir` in the current folder. A second signal stops at once.
    """
    def _handle(signum, frame):
        global _pending
        if _held and _pending is None:
            _pending = signum
            again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {signal.Signals(signum).name} again"
            try:
                os.write(1, f"\nstopping after the current step ({again} to stop at once)\n".encode())
            except OSError:  # stdout closed: the final error line still says where the run stopped
                pass
            return
        _pending = None
        raise Stopped(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _handle)


@contextmanager
def signals_held_to_step_boundaries():
    """Hold signals (see `stop_on_signals`) until `stop_if_signalled` is called between steps."""
    global _held, _pending
    _held, _pending = True, None
    try:
        yield
        stop_if_signalled()
    finally:
        _held, _pending = False, None


def stop_if_signalled() -> None:
    """Raise Stopped for a signal held since the last call (a training callback calls this between steps)."""
    global _pending
    if _pending is not None:
        signum, _pending = _pending, None
        raise Stopped(signum)


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
