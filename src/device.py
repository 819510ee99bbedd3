"""Platform setup: CPU kernel settings, device selection, seeds. One code path for CPU, GPU and Ascend."""
from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.config import Config
from src.errors import UserError, first_line

log = logging.getLogger("train")
ISA_VAR = "ONEDNN_MAX_CPU_ISA"


def _cpu_has_avx512() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def prepare_cpu_environment() -> str | None:
    """Cap oneDNN at AVX2 on AVX-512 CPUs, before MindSpore runs its first convolution.

    Measured with MindSpore 2.10: on AVX-512 CPUs oneDNN picks its reference kernel for every k x k
    convolution (ONEDNN_VERBOSE shows `jit_uni_ncsp:conv+ref:any`); capped at AVX2 it uses the jit
    gemm path, ~9x faster for MobileNetV2 training. A value the user already set is left alone.
    Returns a note to log once, or None when nothing was changed.
    """
    if ISA_VAR in os.environ:
        return None
    if not _cpu_has_avx512():
        return None
    os.environ[ISA_VAR] = "AVX2"
    return (f"CPU: set {ISA_VAR}=AVX2 (MindSpore's oneDNN falls back to reference convolution kernels "
            f"on AVX-512; export {ISA_VAR} yourself to choose another value)")


def prepare_cpu_threads(platform: str) -> None:
    """On CPU, idle OpenMP threads sleep instead of spinning: OMP_WAIT_POLICY=PASSIVE unless the user set it.

    Measured on 2 cores (docs/performance.md): with libgomp's default spin-wait, the threads of the C++ kernels
    (src/models/kernels) keep spinning after each kernel and MindSpore's next convolution runs ~1.5x slower; passive
    waiting costs the kernels nothing measurable. libgomp reads the variable when MindSpore loads it, so call
    this before importing mindspore.
    """
    if platform == "CPU":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextlib.contextmanager
def _quiet_stderr():
    """MindSpore's device probes print library-loading noise on C++ stderr; hide it."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    group_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> dict:
        """num_shards/shard_id for the dataset readers (None when not distributed)."""
        if self.group_size == 1:
            return {"num_shards": None, "shard_id": None}
        return {"num_shards": self.group_size, "shard_id": self.rank}


def setup_device(cfg: Config, distributed: bool = False) -> RankInfo:
    """Select the platform (graph mode), start data parallelism when asked, and seed every generator.

    Call before building datasets or nets. With run_distribute the communication backend (HCCL on Ascend,
    NCCL on GPU, MindSpore's own on CPU) is initialised and gradients are averaged over all ranks.
    """
    note = prepare_cpu_environment() if cfg.platform == "CPU" else None
    import mindspore as ms

    if cfg.platform != "CPU":
        with _quiet_stderr():
            available = ms.hal.is_available(cfg.platform)
        if not available:
            raise UserError(f"platform {cfg.platform} is not available on this machine (MindSpore finds no "
                            f"{cfg.platform} device or driver; use --platform CPU or install the "
                            f"{cfg.platform} runtime)")
        device_id = int(os.environ.get("DEVICE_ID", cfg.device_id)) if distributed else cfg.device_id
        if distributed and cfg.platform == "GPU":
            ms.set_device("GPU")  # msrun assigns each worker its local GPU
        else:
            ms.set_device(cfg.platform, device_id)
    else:
        ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    if note:
        log.info(note)
    info = _init_data_parallel() if distributed else RankInfo()
    set_seed(cfg.seed)
    return info


def _init_data_parallel() -> RankInfo:
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    from src.lifeline import LAUNCHER_ENV

    try:
        init()
    except RuntimeError as exc:
        first = first_line(exc).split(". ")[0].rstrip(".")[:200]  # MindSpore goes on about grepping its logs
        hint = ("see the scheduler's and the other workers' logs; every node must start within CLUSTER_TIMEOUT"
                if LAUNCHER_ENV in os.environ else "launch with sh scripts/run_train.sh, which sets up every rank")
        raise UserError(f"run_distribute could not start the communication backend: {first} ({hint})") from None
    info = RankInfo(get_rank(), get_group_size())
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=info.group_size)
    log.info("data parallel: rank %d of %d", info.rank, info.group_size)
    return info


def set_seed(seed: int) -> None:
    import mindspore as ms
    import mindspore.dataset as ds

    random.seed(seed)
    np.random.seed(seed)
    ms.set_seed(seed)
    ds.config.set_seed(seed)


def amp_speed_warning(cfg: Config) -> str | None:
    """Paddle-style warning when mixed precision cannot make this device faster."""
    if cfg.amp_level == "O0":
        return None
    if cfg.platform == "CPU":
        return (f"AMP {cfg.amp_level} brings no speed-up on CPU (float16 runs no faster than float32 there); "
                "it trains, but use --amp_level O0 for speed")
    if cfg.platform == "GPU":
        import mindspore as ms

        major, minor = ms.hal.get_device_capability(cfg.device_id)
        if major < 7:
            name = ms.hal.get_device_name(cfg.device_id)
            return (f"AMP only speeds up NVIDIA GPUs with Compute Capability 7.0 or higher, current GPU is: "
                    f"{name}, with Compute Capability: {major}.{minor}")
    return None
