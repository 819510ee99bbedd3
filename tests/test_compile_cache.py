"""The checked compile cache (src/compile_cache.py): a rerun loads its graphs and trains the same weights; graphs are
never taken for another compile, damaged or half-written files are compiled again, and a cache that cannot be
written costs the cache only."""
from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import mindspore as ms
import numpy as np
from conftest import ROOT, TINY_TRAIN, make_imagefolder, run_cli, with_flags

import src.compile_cache as compile_cache
from src.compile_cache import EXCLUDED, data_facts, key_material
from src.config import Config

SUMMARY = re.compile(r"compile cache: (\d+) graphs loaded, (\d+) compiled and stored")

# two cells with the same parameters (names, shapes) and inputs, told apart only by what they compute
CELLS = textwrap.dedent("""
    import logging, sys
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor, nn
    sys.path.insert(0, {root!r})
    from src.compile_cache import compile_cache
    from src.config import Config

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    ms.set_context(mode=ms.GRAPH_MODE)

    class Double(nn.Cell):  # a scale other than 2 makes it another graph with the same parameters and inputs
        def __init__(self, scale):
            super().__init__()
            self.d = nn.Dense(4, 3)
            self.scale = scale

        def construct(self, x):
            return self.d(x) * self.scale

    class Shift(nn.Cell):
        def __init__(self):
            super().__init__()
            self.d = nn.Dense(4, 3)

        def construct(self, x):
            return self.d(x) - 100

    scale, batch = float(sys.argv[3]), int(sys.argv[4])
    cells = {{"a": Double(scale), "b": Shift()}}
    x = Tensor(np.ones((batch, 4), np.float32))
    with compile_cache(Config(compile_cache=sys.argv[1]), "test", {{}}):
        for name in sys.argv[2]:
            net = cells[name]
            plain = net.d.weight.asnumpy().sum(1) + net.d.bias.asnumpy()
            want = plain * scale if name == "a" else plain - 100
            got = net(x).asnumpy()
            print(name, "right" if got.shape == (batch, 3) and np.allclose(got[0], want) else "WRONG")
""")


def _cells(tmp_path: Path, store: Path, order: str, scale: float = 2, batch: int = 2) -> subprocess.CompletedProcess:
    script = tmp_path / "cells.py"
    script.write_text(CELLS.format(root=str(ROOT)))
    return subprocess.run([sys.executable, str(script), str(store), order, str(scale), str(batch)],
                          capture_output=True, text=True, timeout=120)


def _summary(text: str) -> tuple[int, int]:
    found = SUMMARY.findall(text)
    assert found, text[-2000:]
    return int(found[-1][0]), int(found[-1][1])


def test_cells_compiled_in_another_order_each_run_their_own_graph(tmp_path):
    """MindSpore alone numbers cached graphs by compile order: the second process would run Double's graph for Shift."""
    store = tmp_path / "store"
    first = _cells(tmp_path, store, "ab")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "a right" in first.stdout and "b right" in first.stdout
    assert _summary(first.stdout) == (0, 2)
    second = _cells(tmp_path, store, "ba")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "b right" in second.stdout and "a right" in second.stdout, second.stdout
    assert _summary(second.stdout) == (2, 0)


def test_a_python_attribute_or_an_input_shape_of_another_value_is_another_graph(tmp_path):
    """What MindSpore's own cache got wrong (docs/performance.md): it ran the graph of scale 2 for scale 3, and of
    batch 2 for batch 3. Here each is compiled; the first is loaded again when asked for again."""
    store = tmp_path / "store"
    first = _cells(tmp_path, store, "a")
    assert _summary(first.stdout) == (0, 1), first.stdout + first.stderr[-2000:]
    for scale, batch in ((3, 2), (2, 3)):
        run = _cells(tmp_path, store, "a", scale, batch)
        assert run.returncode == 0 and "a right" in run.stdout, run.stdout + run.stderr[-2000:]
        assert _summary(run.stdout) == (0, 1), run.stdout + run.stderr[-2000:]
    again = _cells(tmp_path, store, "a")
    assert "a right" in again.stdout and _summary(again.stdout) == (1, 0), again.stdout + again.stderr[-2000:]


def test_a_damaged_stored_graph_is_compiled_again(tmp_path):
    store = tmp_path / "store"
    assert _cells(tmp_path, store, "a").returncode == 0
    (graph,) = store.glob("*/graphs/*.mindir")
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])  # a disk that lost the file's end
    again = _cells(tmp_path, store, "a")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "a right" in again.stdout
    assert _summary(again.stdout) == (0, 1)
    (stored,) = store.glob("*/graphs/*.mindir")  # the damaged file replaced by the graph compiled again
    assert stored.name.split(".")[1] == hashlib.sha256(stored.read_bytes()).hexdigest()[:16]
    assert _summary(_cells(tmp_path, store, "a").stdout) == (1, 0)


def test_a_killed_run_leaves_no_graph_and_its_folder_is_removed_later(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = store / f".run-{socket.gethostname()}-{dead.pid}-abc"  # what a kill -9 during a compile leaves behind
    (left / "rank_0" / "graph_cache").mkdir(parents=True)
    (left / "rank_0" / "graph_cache" / "compile_cache_0.mindir").write_bytes(b"half a graph")
    (left / "lock").touch()  # its process held the lock; the kernel let go of it with the process
    os.utime(left, (time.time() - 120, time.time() - 120))
    run = _cells(tmp_path, store, "a")
    assert run.returncode == 0 and "a right" in run.stdout
    assert not left.exists()
    assert [p.name for p in store.iterdir() if p.name.startswith(".run-")] == []  # its own folder went at its end


def test_a_store_that_cannot_be_written_costs_the_cache_not_the_run(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = _cells(tmp_path, blocker / "store", "ab")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "a right" in run.stdout and "b right" in run.stdout
    assert re.search(r"compile cache: cannot use .*a-file/store .*compiling every graph", run.stdout + run.stderr)


def test_the_key_holds_every_config_value_but_the_paths(monkeypatch):
    base = key_material(Config(), "train", {"classes": 2}, 0, 1)
    same = {"output_path": "/elsewhere", "dataset_path": "/other/data", "tracker": "mlflow", "epoch_size": 3,
            "lr_max": 0.5, "print_freq": 7, "num_parallel_workers": 3, "auto_augment": "randaug-m9-n2"}
    assert key_material(Config(**same), "train", {"classes": 2}, 0, 1) == base
    for change in ({"width": 0.5}, {"image_size": 48}, {"weight_decay": 1e-4}, {"seed": 2}, {"label_smooth": 0.2},
                   {"amp_level": "O2"}, {"mixup": 0.2}, {"drop_path_rate": 0.1}, {"opt": "adamw"}):
        assert key_material(Config(**change), "train", {"classes": 2}, 0, 1) != base, change
    assert key_material(Config(), "eval", {"classes": 2}, 0, 1) != base
    assert key_material(Config(), "train", {"classes": 3}, 0, 1) != base
    assert key_material(Config(), "train", {"classes": 2}, 1, 2) != base
    assert key_material(Config(enable_modelarts=True), "train", {"classes": 2}, 0, 1) == base  # a ModelArts restart
    monkeypatch.setenv("RANK_SIZE", "1")  # what a one-device launcher exports: the key has the rank and world size
    monkeypatch.setenv("RANK_ID", "0")
    assert key_material(Config(), "train", {"classes": 2}, 0, 1) == base
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    assert key_material(Config(), "train", {"classes": 2}, 0, 1) != base
    source = SimpleNamespace(class_names=["cat", "dog"])  # the image counts reach a graph only as class weights
    assert data_facts(source, (10, 6)) == data_facts(source, (8, 8)) == {"classes": 2, "train_per_class": None}
    assert data_facts(source, (10, 6), "balanced") != data_facts(source, (8, 8), "balanced")
    assert EXCLUDED <= set(Config().to_dict())  # a renamed key would silently join the key: keep the list true


def test_the_key_holds_the_files_mindspore_checks_from_the_entry_script(tmp_path, monkeypatch):
    """MindSpore keeps one hash of the entry script's files per folder: train.py, a test calling train() and a run
    under cProfile must not share a store (each replaced the others' hash, and none of the graphs loaded), while two
    clones of the package in other folders do."""
    from mindspore.graph import api

    def entry(name: str, text: str) -> str:
        script = tmp_path / name / "train.py"
        script.parent.mkdir(exist_ok=True)
        script.write_text(text)
        monkeypatch.setattr(api, "entry_script_path", str(script))
        return key_material(Config(), "train", {"classes": 2}, 0, 1)["entry"]

    first = entry("clone1", "print('train')\n")
    assert entry("clone2", "print('train')\n") == first
    assert entry("profiled", "import cProfile\n") != first


def _weights(ckpt: Path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(ckpt)).items() if isinstance(v, ms.Tensor)}


def test_a_rerun_loads_every_graph_and_trains_the_same_weights(trained, tmp_path):
    """The shared run's command again, in another folder: from the cache, bit-identical weights."""
    out = tmp_path / "again"
    proc = run_cli("train.py", "--dataset_path", str(trained.data), "--output_path", str(out), "--epoch_size", "2",
                   "--save_checkpoint_epochs", "1", "--keep_checkpoint_max", "5", *TINY_TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    loaded, compiled = _summary(log)
    assert (loaded, compiled) == (3, 0), log[-2000:]
    first, again = (_weights(next((o / "checkpoint").glob("mobilenetv2-2_*.ckpt"))) for o in (trained.out, out))
    assert first.keys() == again.keys()
    assert [k for k in first if not np.array_equal(first[k], again[k])] == []


def test_fine_tuning_from_the_cache_trains_the_same_weights(trained, tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=("ant", "bee", "cow"))
    store = tmp_path / "store"
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        proc = run_cli("train.py", "--dataset_path", str(data), "--output_path", str(out), "--epoch_size", "1",
                       "--pretrain_ckpt", str(trained.out / "checkpoint" / "best.ckpt"), "--filter_head", "True",
                       "--compile_cache", str(store), *with_flags(TINY_TRAIN, num_classes=3))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(out)
    assert _summary((outs[0] / "train.log").read_text()) == (0, 3)
    assert _summary((outs[1] / "train.log").read_text()) == (3, 0)
    first, again = (_weights(next((o / "checkpoint").glob("mobilenetv2-1_*.ckpt"))) for o in outs)
    assert [k for k in first if not np.array_equal(first[k], again[k])] == []


def test_the_clean_up_touches_only_the_caches_own_folders(tmp_path, monkeypatch):
    """--compile_cache ~ or a folder of other things: over the size limit, only entries go, the oldest first, never
    the one in use, never a folder of the user's; a live run's private folder stays."""
    import fcntl

    root = tmp_path / "home"
    mine = root / "my_datasets"
    mine.mkdir(parents=True)
    (mine / "big.bin").write_bytes(b"x" * 5000)
    entries = []
    for i, name in enumerate(("a" * 20, "b" * 20, "c" * 20)):
        entry = root / name
        (entry / "graphs").mkdir(parents=True)
        (entry / "key.json").write_text("{}")
        (entry / "graphs" / "g.mindir").write_bytes(b"g" * 1000)
        os.utime(entry, (1000 + i, 1000 + i))
        entries.append(entry)
    live = root / ".run-otherhost-1-xyz"
    live.mkdir()
    os.utime(live, (1000, 1000))
    with open(live / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        monkeypatch.setattr(compile_cache, "MAX_BYTES", 1500)
        compile_cache._reap(root, keep=entries[0])
        assert live.exists()
    os.utime(live, (1000, 1000))  # (opening its lock file touched the folder)
    assert mine.exists() and (mine / "big.bin").stat().st_size == 5000
    assert entries[0].exists()  # the oldest, but in use
    assert not entries[1].exists()  # the oldest of the others
    assert entries[2].exists()  # within the limit again
    compile_cache._reap(root, keep=entries[0])
    assert not live.exists()  # its lock is free now: its process is gone, on whatever host it ran


def test_an_editors_lock_file_in_the_sources_does_not_stop_a_run(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "run.py").write_text("x = 1\n")
    (tmp_path / "src" / ".#run.py").symlink_to(tmp_path / "nowhere")  # what Emacs leaves while a file is edited
    monkeypatch.setattr(compile_cache, "ROOT", tmp_path)
    assert len(compile_cache._sources_digest()) == 64
