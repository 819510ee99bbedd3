"""A rank started by scripts/run_train.sh ends when its launcher does, however the launcher died.

kill -9, the OOM killer or a scheduler's hard stop end the launcher without a word to its ranks, and msrun puts each
worker in a session of its own, so nothing else would stop them: they would go on training into the output folder.
Each rank therefore starts a small watcher process (this file, run as a script) that waits on the launcher and on
the rank. If the rank ends first, so does the watcher. If the launcher ends first, the watcher stops the rank as
SIGTERM does (at its next safe point, every file complete), again after a grace period, and with SIGKILL after
another: every file of a run is written through a temp file and a rename and the next run into the folder undoes
a half-done commit, so even that leaves complete files. msrun's scheduler writes nothing and gets SIGKILL at once.

A process and not a thread: a rank blocked inside MindSpore (a collective whose peer has stopped, the scheduler's
wait for its workers) may hold the GIL for minutes, and then no thread of it would wake. pidfds name the launcher
and the rank, so a reused PID is never signalled.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

LAUNCHER_ENV = "CLS_LAUNCHER_PID"  # set by src.launch for every process it starts
GRACE_S = 10.0


def stop_with_launcher() -> None:
    """In a rank of scripts/run_train.sh (LAUNCHER_ENV set), start the watcher of this process and its launcher."""
    pid = os.environ.get(LAUNCHER_ENV, "")
    if not pid.isdigit() or int(pid) == os.getpid():
        return
    scheduler = os.environ.get("MS_ROLE") == "MS_SCHED"
    subprocess.Popen([sys.executable, "-S", os.path.abspath(__file__), pid, str(os.getpid()), str(GRACE_S),
                      "1" if scheduler else "0"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     start_new_session=True)  # its stderr is the rank's: the warning lands in the rank's log


def _open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return -1
    except (AttributeError, OSError):  # no pidfds (not Linux >= 5.3): poll the PID
        return None


def _ended(pid: int, fd: int | None, timeout: float) -> bool:
    """Whether process `pid` ends within `timeout` seconds."""
    if fd == -1:
        return True
    if fd is not None:
        return bool(select.select([fd], [], [], timeout)[0])
    end = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        if time.monotonic() >= end:
            return False
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))


def watch(launcher: int, rank: int, grace_s: float, scheduler: bool) -> int:
    rank_fd, launcher_fd = _open(rank), _open(launcher)
    while not _ended(launcher, launcher_fd, 1.0):
        if _ended(rank, rank_fd, 0):
            return 0  # the rank ended first: nothing to do
    if _ended(rank, rank_fd, 0):
        return 0
    os.write(2, f"warning: the launcher (PID {launcher}) has ended: stopping this rank (PID {rank})\n".encode())
    for sig in (signal.SIGKILL,) if scheduler else (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        try:
            if rank_fd is not None and rank_fd >= 0:
                signal.pidfd_send_signal(rank_fd, sig)
            else:
                os.kill(rank, sig)
        except ProcessLookupError:
            return 0
        if _ended(rank, rank_fd, grace_s):
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(watch(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"))
