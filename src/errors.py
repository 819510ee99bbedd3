"""User-facing errors and the entry-point wrapper that turns them into one line and exit code 2."""
from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from stat import S_ISDIR, S_ISREG


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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries append pages of advice), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def not_a_file(path: Path) -> str | None:
    """None for a regular file (or a link to one); else what `path` is instead, in words for a message: "not found",
    "is a folder", "is a link to /dev/zero, which is not a regular file" (a device reads forever)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"is a symbolic link to {os.readlink(path)}, which does not exist" if path.is_symlink() else "not found"
    except OSError as exc:  # a loop of links, no permission on a folder of the path
        return f"cannot be opened ({exc.strerror})"
    if S_ISREG(st.st_mode):
        return None
    if S_ISDIR(st.st_mode):
        return "is a folder"
    target = f"a link to {os.path.realpath(path)}, which" if path.is_symlink() else "a device, pipe or socket: it"
    return f"is {target} is not a regular file"


class NothingToDo(Exception):
    """The job asked for is already done (a restarted job whose run has finished): the message says so, exit 0."""


class Interrupted(Exception):
    """Training stopped by Ctrl-C or a signal; the message says where and how to resume."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.signum = signum


class Stopped(KeyboardInterrupt):
    """Raised in the main thread for Ctrl-C, SIGTERM (a scheduler or `kill`) or SIGHUP: see `stop_on_signals`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_pending: int | None = None  # a signal the run has not stopped for yet
_received: int | None = None  # the last signal received (an exception that wraps a Stopped is an interruption)
_handled: set[int] = set()  # the signals stop_on_signals handles


def _handle(signum, frame):
    global _pending, _received
    _received = signum
    if _pending is None:
        _pending = signum
        try:
            os.write(1, b"\nstopping at the next safe point (press Ctrl-C or send the signal again to stop at "
                        b"once)\n")
        except OSError:  # stdout closed: the final error line still says where the run stopped
            pass
        return
    # the second signal stops at once; `_pending` stays set, so should the code it lands in swallow the exception
    # (MindSpore's graph compiler does), the next safe point stops the run all the same
    raise Stopped(_pending)  # reported as the first signal: the one that stopped the run


def _install(sig: int) -> None:
    signal.signal(sig, _handle)
    # restart interrupted system calls: MindSpore's data threads take an EINTR for a failed pipeline
    signal.siginterrupt(sig, False)


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT), SIGTERM (a scheduler or `kill`) and SIGHUP end the run with one line and a non-zero exit.

    The first signal is held until the run reaches a safe point (`stop_if_signalled`: between training steps,
    between images of the data check, between phases of the set-up): raised anywhere else it can land inside an
    import or a graph compile, which MindSpore turns into a page of errors, a crash, or swallows. A second signal
    stops at once. Called first thing by train.py, before the heavy imports.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # a signal ignored when the process started stays ignored (`nohup` ignores SIGHUP, a shell's `&` SIGINT)
        if sig in _handled or signal.getsignal(sig) is not signal.SIG_IGN:
            _handled.add(sig)
            _install(sig)


def stop_if_signalled() -> None:
    """A safe point: raise Stopped for a signal received since the run started (see `stop_on_signals`)."""
    # MindSpore's runtime installs a C-level SIGINT handler of its own that turns SIGINT into a SIGTERM of the
    # process (again at every graph run; signal.getsignal does not see it): put ours back at every safe point, so a
    # Ctrl-C outside a step exits 130 (inside a step it arrives as SIGTERM: 143)
    for sig in _handled:
        _install(sig)
    if _pending is not None:
        raise Stopped(_pending)


def interrupting_signal(exc: BaseException) -> int | None:
    """The signal `exc` stands for: a Stopped's own, the signal received before any other exception (an error
    raised while the run was stopping is reported as the interruption), SIGINT for a plain KeyboardInterrupt;
    None for an error that no signal caused."""
    return (getattr(exc, "signum", None) or _received
            or (signal.SIGINT if isinstance(exc, KeyboardInterrupt) else None))


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
    except NothingToDo as exc:
        print(exc, flush=True)
        return 0
    except Interrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except (KeyboardInterrupt, Exception) as exc:
        signum = interrupting_signal(exc)
        if signum is None and not isinstance(exc, OSError):  # a bug: the traceback is the report
            raise
        if _SHOW_TRACEBACKS and not isinstance(exc, KeyboardInterrupt):
            traceback.print_exc()
        if signum is not None:
            print("error: interrupted (files written so far are complete)", file=sys.stderr)
            return 128 + signum
        # an OSError the checks could not foresee (a path too long, a disk that fills up, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc} (check the path, its length and the free space, and try again)",
              file=sys.stderr)
        return 2
