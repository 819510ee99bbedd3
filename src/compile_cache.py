"""MindSpore's graph compile cache, made safe to leave on: a rerun of the same run skips most of its compile.

MindSpore 2.10 saves each compiled graph as `compile_cache_<n>.mindir`, n counting the compiles of the process, and
loads file n at the n-th compile of a later process when the package's Python files hash the same. It checks nothing
else (measured): a cached train step of `--width 0.25` was loaded for `--width 0.5` and crashed in ApplyMomentum, and
two cells compiled in the other order silently ran each other's graphs. So this module never lets MindSpore see a
folder it could misread:

- A store entry is keyed by everything a graph can hold as a constant: MindSpore's and Python's versions, the
  package's sources and its C++ kernel library, the tool, the files MindSpore itself hashes from the entry script,
  every resolved config key but those no graph holds (EXCLUDED: paths, trackers, the data pipeline, callbacks,
  checkpoint policy, the LR schedule's values), the classes (and train images per class when the loss weighs by
  them), the rank and world size, and the environment MindSpore compiles under. Another value of any of them is
  another entry.
- Within an entry, graphs are stored by a signature of the compile itself (the cell's class, the phase, the inputs'
  shapes and types, every parameter's name, shape and type, and every sub-cell's plain attributes, small constant
  tensors and primitives' attributes), and verified by their content hash.
- Each process compiles in a private folder that holds at most one graph at a time: right before each compile, the
  stored graph of that compile's signature is put there under the name MindSpore will look for; a new graph MindSpore
  writes is stored (atomically, file by file) as soon as its compile returns. Anything unexpected (a compile
  counter out of step, a jit function compiling, an input it cannot describe) turns the cache off for the rest of
  the process: a graph is compiled, never guessed.
Parameter values are not part of a cached graph (measured with MindSpore's own cache: a seed-2 run over a seed-1 run's
cache ended with the weights of an uncached seed-2 run, bit for bit; tests/test_compile_cache.py checks it for
--pretrain_ckpt, test_cli.py for --resume_ckpt auto), so checkpoints load as without the cache.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.config import Config
from src.files import write_atomically

log = logging.getLogger("train")
FORMAT = 1  # the store's layout; another value starts a new store
ROOT = Path(__file__).resolve().parent.parent
# config keys no graph holds: where things are and where curves go; what only the host reads (the data pipeline,
# the callbacks, the checkpoint policy); and the LR schedule, which the optimizer holds as a Parameter (values are
# not part of a graph; its length is in the compile's signature). No module that builds a graph reads any of them.
EXCLUDED = frozenset({
    "dataset_path", "train_list", "val_list", "train_csv", "val_csv", "csv_image_column", "csv_label_column",
    "class_names", "output_path", "pretrain_ckpt", "resume_ckpt", "tracker", "mlflow_uri", "mlflow_experiment",
    "mlflow_run_name", "data_url", "train_url", "checkpoint_url", "enable_modelarts", "ckpt_file", "file_name",
    "onnx_file", "device_id",
    "compile_cache", "debug",
    "dataset", "num_parallel_workers", "sampler", "crop_scale_min", "random_flip", "color_jitter", "auto_augment",
    "mean", "std", "crop_pct", "interpolation", "resume_data", "print_freq", "save_checkpoint_epochs",
    "keep_checkpoint_max", "eval_interval", "run_eval", "fingerprint_data", "max_steps",
    "epoch_size", "lr_decay_mode", "lr_init", "lr_max", "lr_end", "warmup_epochs", "lr_step_size", "lr_gamma",
    "lr_milestones", "lr_step_per_epoch", "num_cycles", "cycle_decay"})
# environment variables of MindSpore's cluster set-up (addresses, timeouts): they differ per launch, no graph holds them
CLUSTER_ENV = frozenset({"MS_SCHED_HOST", "MS_SCHED_PORT", "MS_NODE_ID", "MS_ROLE", "MS_NODE_TIMEOUT",
                         "MS_TOPO_TIMEOUT", "MS_RECEIVE_MSG_TIMEOUT", "MS_RETRY_INTERVAL", "MS_COMPILER_CACHE_ENABLE",
                         "MS_COMPILER_CACHE_PATH"})
# (RANK_ID and RANK_SIZE are not: the key holds the rank and world size the run actually has)
OTHER_ENV = ("ONEDNN_MAX_CPU_ISA", "CLS_CPU_KERNELS", "OMP_NUM_THREADS")
ENABLE, PATH = "MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"
COMPILE_OPTIONS = frozenset({"do_convert", "jit_config_dict"})  # compile() keywords that are not the cell's inputs
ENTRY = re.compile(r"[0-9a-f]{20}")  # a store entry's folder name (the key's hash)
LOCK = "lock"
DEPENDENCY = "compile_dependency.hash"  # MindSpore's hash of the Python files, checked before it loads a graph
# what MindSpore writes on a cell about its compiles (they hold object ids and times)
BOOKKEEPING = frozenset({"arguments_key", "current_phase", "compile_phase", "phase"})
MAX_BYTES = 2 << 30  # the store keeps the entries used last within this size


def store_root(setting: str) -> Path | None:
    """The store of the `compile_cache` key: auto is $CLS_CACHE_DIR/compile (default ~/.cache/mindspore_cls)."""
    if setting == "none":
        return None
    if setting == "auto":
        from src.data.image_check import cache_root

        return cache_root() / "compile"
    return Path(setting).expanduser()


def _sources_digest() -> str:
    digest = hashlib.sha256()
    files = sorted([*ROOT.glob("*.py"), *(ROOT / "src").rglob("*.py"), *(ROOT / "src").rglob("*.cc")])
    for path in files:
        if path.name.startswith((".", "#")) or not path.is_file():  # an editor's lock or backup file
            continue
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _entry_digest() -> str:
    """MindSpore's own check, made part of the key: the hash of the Python files it finds from the entry script
    (sys.argv[0] and what it imports outside site-packages). One store holds one such hash (DEPENDENCY), so two
    entry points sharing a store (train.py and a test calling train(), or a run under cProfile) would replace each
    other's hash and MindSpore would load none of the graphs (measured: 0 of 3 loaded after a cProfile run)."""
    try:
        from mindspore.graph.api import _get_compile_cache_dep_files

        files = sorted(_get_compile_cache_dep_files())
    except Exception as exc:  # noqa: BLE001 (a private function of MindSpore's: its absence costs only sharing)
        return f"{os.path.realpath(sys.argv[0])} ({type(exc).__name__})"
    digest = hashlib.sha256()
    for path in files:
        try:
            digest.update(Path(path).read_bytes() + b"\0")
        except OSError:
            digest.update(f"{path} unreadable\0".encode())
    return digest.hexdigest()


def _kernel_library(cfg: Config) -> str:
    """The C++ kernels' library path (graphs name it in their Custom ops; its name holds its sources' hash)."""
    if cfg.platform != "CPU":
        return ""
    from src.models.kernels import KernelUnavailable, build_library

    try:
        return str(build_library())
    except KernelUnavailable as exc:
        return f"unavailable: {exc}"


def key_material(cfg: Config, tool: str, facts: dict[str, Any], rank: int, group_size: int) -> dict[str, Any]:
    import mindspore as ms

    env = {k: v for k, v in os.environ.items() if k.startswith("MS_") and k not in CLUSTER_ENV}
    env.update({k: os.environ[k] for k in OTHER_ENV if k in os.environ})
    if cfg.platform != "CPU" and "DEVICE_ID" in os.environ:  # the device a graph is built for
        env["DEVICE_ID"] = os.environ["DEVICE_ID"]
    return {"format": FORMAT, "mindspore": ms.__version__, "python": sys.version.split()[0], "tool": tool,
            "sources": _sources_digest(), "entry": _entry_digest(), "kernels": _kernel_library(cfg),
            "config": {k: v for k, v in sorted(cfg.to_dict().items()) if k not in EXCLUDED},
            "data": facts, "rank": rank, "group_size": group_size, "env": dict(sorted(env.items()))}


def _describe(value: Any) -> Any:
    """An input of a compile as the graph sees it; None when it is something this module cannot describe."""
    from mindspore import Tensor

    if isinstance(value, Tensor):
        return ["tensor", list(value.shape), str(value.dtype)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return [type(value).__name__, value]
    if isinstance(value, (tuple, list)):
        items = [_describe(v) for v in value]
        return None if any(i is None for i in items) else [type(value).__name__, items]
    return None


def _plain(value: Any) -> Any:
    """A constant a graph may fold in, as text; the type alone for what cannot be written stably (functions)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return type(value).__qualname__


def _structure(cell) -> str:
    """The cells of `cell` with their plain attributes, the constants their tensors hold and their primitives'
    attributes: the constants a graph folds in, so that two cells that differ only in them never share a graph."""
    import numpy as np
    from mindspore import Parameter, Tensor
    from mindspore.nn import Cell
    from mindspore.ops import Primitive

    digest = hashlib.sha256()
    for name, sub in cell.cells_and_names():
        parts: list[Any] = [name, type(sub).__module__, type(sub).__qualname__, getattr(sub, "_amp_level", "")]
        for attr, value in sorted(vars(sub).items()):
            if attr.startswith("_") or attr in BOOKKEEPING or isinstance(value, (Cell, Parameter)):
                continue
            if isinstance(value, Tensor):
                array = value.asnumpy() if value.size <= 1 << 16 else np.zeros(0)
                parts.append([attr, list(value.shape), str(value.dtype), hashlib.sha256(array.tobytes()).hexdigest()])
            elif isinstance(value, Primitive):
                parts.append([attr, value.name, _plain(dict(value.attrs))])
            else:
                parts.append([attr, _plain(value)])
        for attr, prim in sorted(getattr(sub, "_primitives", {}).items()):
            if prim is not None:
                parts.append([attr, prim.name, _plain(dict(prim.attrs))])
        digest.update(json.dumps(parts, default=str).encode())
    return digest.hexdigest()


@dataclass
class _State:
    store: Path  # this key's entry: graphs/<signature>.<content hash>.mindir, compile_dependency.hash, key.json
    work: Path  # the private folder MindSpore is pointed at
    rank_dir: str
    prefix: str  # MindSpore names its files <role>compile_cache_<n>.mindir in a cluster (MS_WORKER), else no role
    compiles: int = 0  # compiles of this process so far, as MindSpore counts them
    loaded: int = 0
    stored: int = 0
    off: str = ""  # why the cache went off mid-run
    seen: set = field(default_factory=set)

    @property
    def graph_dir(self) -> Path:
        return self.work / self.rank_dir / "graph_cache"


def _content_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _atomic_copy(src: Path, dest: Path) -> None:
    """A reader sees no file or the whole copy; an OSError is the caller's (it costs the cache, not the run)."""
    write_atomically(dest, lambda tmp: shutil.copyfile(src, tmp), errors=())


class _Guard:
    """Wraps MindSpore's cell compile for one process: puts the stored graph in place, stores new ones."""

    def __init__(self, state: _State):
        from mindspore.graph import api

        self.state, self.api = state, api
        self.cell_compile = api._cell_graph_executor.compile
        self.jit_compile = api._JitExecutor.compile

    def install(self) -> None:
        self.api._cell_graph_executor.compile = self._compile
        guard = self

        def jit_compile(executor, *args, **kwargs):  # nothing in this package compiles a jit function: stay safe
            guard._turn_off("a jit function compiled")
            return guard.jit_compile(executor, *args, **kwargs)
        self.api._JitExecutor.compile = jit_compile

    def uninstall(self) -> None:
        vars(self.api._cell_graph_executor).pop("compile", None)  # the class's method again
        self.api._JitExecutor.compile = self.jit_compile

    def _turn_off(self, why: str) -> None:
        if not self.state.off:
            self.state.off = why
            os.environ[ENABLE] = "0"
            log.info("compile cache: off for the rest of this run (%s); every later graph is compiled", why)

    def _clear(self) -> None:
        for path in self.state.graph_dir.glob("*compile_cache_*.mindir"):
            path.unlink()

    def _compile(self, obj, *args, phase: str = "predict", **kwargs):
        state = self.state
        if state.off:
            return self.cell_compile(obj, *args, phase=phase, **kwargs)
        inputs = _describe([list(args), sorted([k, v] for k, v in kwargs.items() if k not in COMPILE_OPTIONS)])
        quick = (id(obj), phase, json.dumps(inputs))
        if quick in state.seen:  # compiled before in this process: MindSpore reuses it, no counter step
            return self._checked(obj, args, phase, kwargs, None)
        if inputs is None or kwargs.get("jit_config_dict"):  # (a jit_config_dict changes how it compiles)
            self._turn_off(f"{type(obj).__name__} compiles with inputs this cache does not describe")
            return self.cell_compile(obj, *args, phase=phase, **kwargs)
        params = sorted([p.name, list(p.shape), str(p.dtype), bool(p.requires_grad)]
                        for p in obj.parameters_dict().values())
        signature = hashlib.sha256(json.dumps([type(obj).__module__, type(obj).__qualname__, phase, inputs, params,
                                               _structure(obj)]).encode()).hexdigest()[:24]
        return self._checked(obj, args, phase, kwargs, (quick, signature))

    def _checked(self, obj, args, phase, kwargs, new):
        state = self.state
        target = state.graph_dir / f"{state.prefix}compile_cache_{state.compiles}.mindir"
        placed = None
        if new is not None:
            try:
                self._clear()
                placed = self._place(new[1], target)
            except OSError as exc:
                self._turn_off(f"cannot use {state.graph_dir}: {exc.strerror or exc}")
                return self.cell_compile(obj, *args, phase=phase, **kwargs)
        try:
            result = self.cell_compile(obj, *args, phase=phase, **kwargs)
        except BaseException:
            self._turn_off("a compile failed")
            self._clear_quietly()
            raise
        try:
            return self._after(obj, result, target, placed, new)
        except OSError as exc:  # the private folder went away under us (another host's clean-up, say)
            self._turn_off(f"cannot use {state.graph_dir}: {exc.strerror or exc}")
            return result
        finally:
            if placed is not None or state.off:
                self._clear_quietly()  # a graph put in place never waits there for a later compile

    def _clear_quietly(self) -> None:
        try:
            self._clear()
        except OSError:
            pass

    def _after(self, obj, result, target: Path, placed: str | None, new):
        state = self.state
        if state.off or not result[1]:
            return result
        if new is None:  # MindSpore compiled what it had compiled before: the counter moved without our knowing
            self._turn_off(f"{type(obj).__name__} compiled again")
            return result
        state.seen.add(new[0])
        written = sorted(state.graph_dir.glob("*compile_cache_*.mindir"))
        if not written:  # MindSpore logs why on stderr (a full disk, say); the graph itself compiled
            self._turn_off(f"MindSpore wrote no graph into {state.graph_dir}")
            return result
        if written != [target]:
            self._turn_off(f"MindSpore's compile counter is not where this cache expected ({len(written)} files)")
            return result
        state.compiles += 1
        if placed is not None and _content_hash(target) == placed:  # MindSpore loaded it (else it wrote its own)
            state.loaded += 1
        else:
            self._store(new[1], target)
        target.unlink()
        return result

    def _place(self, signature: str, target: Path) -> str | None:
        """Put the stored graph of `signature` where MindSpore will look; its content hash, or None when none is
        stored."""
        for path in (self.state.store / "graphs").glob(f"{signature}.*.mindir"):
            digest = path.name.split(".")[1]
            try:
                if digest != _content_hash(path):  # damaged: compile it again
                    path.unlink(missing_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            except FileNotFoundError:  # replaced by another run's newer graph meanwhile
                continue
            return digest
        return None

    def _store(self, signature: str, written: Path) -> None:
        store = self.state.store
        try:
            (store / "graphs").mkdir(parents=True, exist_ok=True)
            name = f"{signature}.{_content_hash(written)}.mindir"
            _atomic_copy(written, store / "graphs" / name)
            for older in (store / "graphs").glob(f"{signature}.*.mindir"):  # one graph per signature: the newest
                if older.name != name:
                    older.unlink(missing_ok=True)
            dependency = written.with_name(f"{self.state.prefix}{DEPENDENCY}")
            if dependency.is_file():
                _atomic_copy(dependency, store / DEPENDENCY)
            self.state.stored += 1
        except OSError as exc:  # a full disk costs the cache, never the run
            log.warning("compile cache: cannot store a graph in %s (%s); this run goes on without the "
                        "cache", store, exc.strerror or exc)
            self._turn_off("the store is not writable")


def _reap(root: Path, keep: Path) -> None:
    """Private folders whose process is gone (a killed run: its lock is free), and the entries used longest ago
    beyond MAX_BYTES. Only folders this module made are touched: `--compile_cache ~` deletes nothing of yours."""
    for path in root.glob(".run-*"):
        lock = path / LOCK
        try:
            if time.time() - path.stat().st_mtime < 60:  # just made: its lock may not be taken yet
                continue
            with open(lock, "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live run's
            continue
        except OSError:
            pass
        shutil.rmtree(path, ignore_errors=True)
    entries = [(p.stat().st_mtime, p) for p in root.iterdir()
               if ENTRY.fullmatch(p.name) and (p / "key.json").is_file() and p != keep]
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for _, p in entries}
    total = sum(sizes.values())
    for _, path in sorted(entries):
        if total <= MAX_BYTES:
            break
        shutil.rmtree(path, ignore_errors=True)
        total -= sizes[path]


@contextmanager
def compile_cache(cfg: Config, tool: str, facts: dict[str, Any], rank: int = 0,
                  group_size: int = 1) -> Iterator[_State | None]:
    """Within the block, MindSpore's compiles go through the checked cache of the `compile_cache` key. Yields the
    cache's counts (loaded, stored), or None when it is not used."""
    root = store_root(cfg.compile_cache)
    if root is None:
        yield
        return
    if os.environ.get(ENABLE) or os.environ.get(PATH):
        log.info("compile cache: %s is set, so MindSpore's own cache is used as set (it checks only the Python "
                 "files; unset it for this package's checked cache)", ENABLE if os.environ.get(ENABLE) else PATH)
        yield
        return
    if cfg.dataset_sink_mode and cfg.platform != "CPU":
        log.info("compile cache: not used with dataset_sink_mode (the device queue is part of the graph)")
        yield
        return
    lock = None
    try:
        material = key_material(cfg, tool, facts, rank, group_size)
        key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:20]
        store = root / key
        root.mkdir(parents=True, exist_ok=True)
        store.mkdir(exist_ok=True)
        os.utime(store)  # last used, for _reap
        _reap(root, keep=store)
        if not (store / "key.json").is_file():
            text = json.dumps(material, indent=1, default=str)
            write_atomically(store / "key.json", lambda tmp: tmp.write_text(text), errors=())
        work = Path(tempfile.mkdtemp(prefix=f".run-{socket.gethostname()}-{os.getpid()}-", dir=root))
        lock = open(work / LOCK, "w")  # held until the process ends: _reap leaves the folder alone
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        state = _State(store, work, f"rank_{rank}", os.environ.get("MS_ROLE", ""))
        dependency = store / DEPENDENCY
        if dependency.is_file():
            state.graph_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dependency, state.graph_dir / f"{state.prefix}{DEPENDENCY}")
        stored = len(list((store / "graphs").glob("[0-9a-f]*.mindir")))  # (not a copy under way)
    except OSError as exc:
        if lock:
            lock.close()
        log.warning("compile cache: cannot use %s (%s); compiling every graph (set --compile_cache to a "
                    "writable folder, or none)", root, exc.strerror or exc)
        yield
        return
    log.info("compile cache: %s (%s)", store, f"{stored} graphs of earlier runs with this configuration"
             if stored else "a configuration not compiled before")
    guard = _Guard(state)
    os.environ[ENABLE], os.environ[PATH] = "1", str(work)
    guard.install()
    start = time.perf_counter()
    try:
        yield state
    finally:
        guard.uninstall()
        os.environ.pop(ENABLE, None)
        os.environ.pop(PATH, None)
        shutil.rmtree(work, ignore_errors=True)
        lock.close()
        if state.compiles:
            log.info("compile cache: %d graphs loaded, %d compiled and stored%s (%.1f s in the block)", state.loaded,
                     state.stored, f"; off after that: {state.off}" if state.off else "",
                     time.perf_counter() - start)


def data_facts(source, train_counts: tuple[int, ...] | None = None, class_weights: str = "none") -> dict[str, Any]:
    """What a graph can take from the data rather than the config: the classes, and the train images per class
    when the loss weighs the classes by them. (How many images there are shows in the compiles' signatures: the
    batch shapes, the steps per epoch of gradient accumulation, the LR schedule's length.)"""
    weighted = class_weights != "none" and train_counts
    return {"classes": len(source.class_names), "train_per_class": list(train_counts) if weighted else None}
