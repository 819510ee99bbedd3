"""Compile the C++ kernels once per source, compiler and CPU into ~/.cache/mindspore-classification/kernels."""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("depthwise.cc", "batchnorm.cc", "pooling.cc", "maxpool.cc", "optim.cc"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++14")


class KernelUnavailable(Exception):
    """The library could not be built; the message says why and how to fix it."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mindspore-classification" / "kernels"


def _cpu_signature() -> str:
    """-march=native code runs only on CPUs like this one: key the build on the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    wanted = [line for line in info if line.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n" + "\n".join(wanted)


def build_library() -> Path:
    """Path of the compiled library, compiling it once per source/compiler/CPU."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler or not shutil.which(compiler):
        raise KernelUnavailable("no C++ compiler found (install g++, e.g. `apt install g++`, or set CXX)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"C++ compiler {compiler} does not run ({exc})") from None
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\0".join([*texts, version, " ".join(FLAGS), _cpu_signature()]).encode())
    target = _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise KernelUnavailable(f"cannot write the kernel cache {target.parent} ({exc.strerror}; "
                                "set XDG_CACHE_HOME to a writable folder)") from None
    try:
        try:
            proc = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True,
                                  text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelUnavailable(f"{compiler} did not finish building the kernels ({exc})") from None
        if proc.returncode != 0:
            first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:200])
            raise KernelUnavailable(f"{compiler} could not build the kernels: {first}")
        os.replace(tmp, target)  # atomic: parallel workers building at once all end with a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
