"""Measure training, inference or input-pipeline speed on this machine.

  python benchmark.py --model mobilenetv2 --mode train --batch_size 32 --image_size 224
  python benchmark.py --model resnet50 --mode infer --json True
  python benchmark.py --mode data --dataset_path /data/imagenet --batch_size 32 --image_size 224
  python benchmark.py --model mobilenetv2 --mode train --torch_reference ../shared/bench/torch_reference.py

train/infer push synthetic tensors through the real net and training step (same AMP, loss scaling,
optimizer and CPU settings as train.py); data runs the real train pipeline (decode, random resized
crop, flip, normalize, batch) over a folder of images. Reported: images/s (median over the timed steps
after warm-up), median step time, compile time (time to the first step), peak RSS and, for data, the
CPU cost per image. With --json True the last line is one JSON object. --torch_reference runs the
PyTorch reference script in the same run and prints the ratio; --rounds N alternates N timings of this
project (the compiled step is reused) with N runs of the reference and reports the median of the N ratios,
which is far steadier than one pair on a noisy machine.

Each side is timed in its own fresh process started with the environment benchmark.py itself was started with:
importing MindSpore puts OMP_NUM_THREADS=1 into the C-level environment of its process (invisible to os.environ)
and this package sets OMP_WAIT_POLICY=PASSIVE, and a reference started from such a process trained PyTorch on one
thread (docs/performance.md). This process imports neither; the JSON line records each side's threads and the
threading variables it saw (`env`, `torch_env`), and how much CPU this project's idle worker used while the
reference ran (`idle_worker_cpu_s`).
"""
from __future__ import annotations

import os

# The environment this command was started with, before this package or MindSpore sets anything: both sides of
# the comparison start from it.
START_ENV = dict(os.environ)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from src.config import Config, parse_command_line  # noqa: E402
from src.errors import UserError, run_cli  # noqa: E402

TORCH_NAMES = {"mobilenetv2": "mobilenet_v2", "resnet50": "resnet50", "mobilenetv3_large": "mobilenet_v3_large"}
MINDCV_NAMES = {"mobilenetv2": "mobilenet_v2_100", "mobilenetv3_large": "mobilenet_v3_large_100",
                "mobilenetv3_small": "mobilenet_v3_small_100", "resnet50": "resnet50", "resnet101": "resnet101"}
MINDCV_SCRIPT = Path(__file__).resolve().parent / "tools" / "mindcv_reference.py"
# the CPU settings this package's run makes that mindcv's side gets too (MindSpore sets OMP_NUM_THREADS itself)
SHARED_CPU_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "OMP_WAIT_POLICY")
# variables that change how many threads a side uses or how they wait; each side's JSON lists those it had
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_PLACES", "OMP_DYNAMIC",
                    "GOMP_SPINCOUNT", "KMP_DUPLICATE_LIB_OK", "KMP_BLOCKTIME", "KMP_AFFINITY", "MKL_NUM_THREADS",
                    "OPENBLAS_NUM_THREADS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "CLS_CPU_KERNELS")
RESULT = "@benchmark "  # prefix of the worker's result lines on its stdout


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("train", "infer", "data"), default="train")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (batches for --mode data)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--json", default="False", choices=("True", "False", "true", "false", "1", "0"))
    parser.add_argument("--torch_reference", default=None, help="path of shared/bench/torch_reference.py")
    parser.add_argument("--mindcv_reference", default="False", choices=("True", "False", "true", "false", "1", "0"),
                        help="also time mindcv 0.3.0's net of --model (tools/mindcv_reference.py) each round")
    parser.add_argument("--rounds", type=int, default=1, help="alternating timings of this project and the references")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the timed side, started by main


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def thread_env(getenv) -> dict[str, str]:
    """The THREAD_VARIABLES that `getenv` finds set."""
    return {name: value for name in THREAD_VARIABLES if (value := getenv(name)) is not None}


def c_getenv(name: str) -> str | None:
    """The process's C-level environment, which MindSpore changes with setenv and os.environ does not show."""
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    value = libc.getenv(name.encode())
    return None if value is None else value.decode(errors="replace")


def _timed(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def _time_steps(step, steps: int, warmup: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        step()
    return compile_s, _timed(step, steps)


def bench_net(cfg: Config, mode: str, steps: int, warmup: int, rounds: int = 1) -> dict:
    import mindspore as ms
    import numpy as np

    from src.compile_cache import compile_cache
    from src.device import setup_device
    from src.engine.lr_schedule import build_lr_schedule
    from src.engine.train_step import build_train_step, inference_cell
    from src.models import net_from_config

    setup_device(cfg)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((cfg.batch_size, 3, cfg.image_size, cfg.image_size)).astype(np.float32))
    y = ms.Tensor(rng.integers(0, cfg.num_classes, cfg.batch_size).astype(np.int32))
    # the time to first step as train.py has it: from the checked compile cache when this exact benchmark ran before
    # (--compile_cache none: always compiled); the JSON's compile_cache says which
    lr_steps = 1 + warmup + steps * rounds
    with compile_cache(cfg, f"benchmark-{mode}", {"lr_steps": lr_steps}) as cache:
        net = net_from_config(cfg)
        if mode == "train":
            # one LR value per step the optimizer will take (the schedule is indexed by the global step)
            lr = build_lr_schedule("cosine", 0.0, 0.01, 0.0, 0, 1, lr_steps)
            train_step, _ = build_train_step(net, cfg, lr, batches_per_epoch=len(lr))

            def step():
                train_step(x, y).asnumpy()
        else:
            net.set_train(False)
            infer = inference_cell(net, cfg)

            def step():
                infer(x).asnumpy()
        compile_s, times = _time_steps(step, steps, warmup)
    median = statistics.median(times)
    cached = "off" if cache is None else f"{cache.loaded} loaded, {cache.stored} compiled"
    return {"img_per_s": cfg.batch_size / median, "median_step_s": median, "compile_s": compile_s,
            "compile_cache": cached, "step": step}


def bench_data(cfg: Config, steps: int, warmup: int) -> dict:
    from src.data.checks import check_dataset
    from src.data.pipeline import create_dataset

    start = time.perf_counter()
    source = check_dataset(cfg, need_train=True, need_val=False)
    check_s = time.perf_counter() - start
    data = create_dataset(cfg, source, training=True).repeat()  # endless, so any --steps fits
    iterator = data.create_tuple_iterator(output_numpy=True, num_epochs=1)
    compile_s, times = _time_steps(lambda: next(iterator), steps, warmup)
    median = statistics.median(times)
    workers = min(cfg.num_parallel_workers, os.cpu_count() or 1)
    img_per_s = cfg.batch_size / median
    return {"img_per_s": img_per_s, "median_step_s": median, "compile_s": compile_s, "dataset": cfg.dataset,
            "check_s": check_s, "per_image_ms": 1000 * workers / img_per_s, "workers": workers}


def _threads_here() -> dict:
    """Threads of this (worker) process right after its timed steps, and who set how many."""
    import mindspore as ms

    from src.models.kernels import kernel_threads

    return {"process": len(os.listdir("/proc/self/task")), "mindspore_runtime": ms.get_context("runtime_num_threads"),
            "cpp_kernels_openmp": kernel_threads()}


def worker(cfg: Config, args: argparse.Namespace) -> int:
    """The timed side: one result line after the first timing, then one more per `again` line on stdin."""
    from src.device import prepare_cpu_threads
    from src.logs import quiet_mindspore

    quiet_mindspore()
    prepare_cpu_threads(cfg.platform)
    if args.mode == "data":
        result = bench_data(cfg, args.steps, args.warmup)
    else:
        result = bench_net(cfg, args.mode, args.steps, args.warmup, args.rounds)
    step = result.pop("step", None)
    result.update(threads=_threads_here(), env=thread_env(c_getenv), peak_rss_mb=peak_rss_mb())
    print(RESULT + json.dumps(result), flush=True)
    for line in sys.stdin:
        if line.strip() == "again" and step is not None:
            img_per_s = cfg.batch_size / statistics.median(_timed(step, args.steps))
            print(RESULT + json.dumps({"img_per_s": img_per_s}), flush=True)
    return 0


class _Worker:
    """This project's side in a fresh process with START_ENV; `result()` waits for its next result line."""

    def __init__(self, argv: Sequence[str]):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--worker"],
                                     env=START_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def result(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
            sys.stderr.write(line)  # MindSpore writing to stdout; keep this process's stdout for the report
        code = self.proc.wait()
        raise _WorkerEnded(code)  # it said why on its stderr, which is ours

    def again(self) -> dict:
        try:
            self.proc.stdin.write("again\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it has ended: result() says how
            pass
        return self.result()

    def cpu_s(self) -> float:
        """CPU seconds the worker has used so far (user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _WorkerEnded(Exception):
    def __init__(self, code: int):
        super().__init__(f"the benchmark worker ended with exit code {code}")
        self.code = code


def torch_reference(script: str, cfg: Config, mode: str) -> dict:
    """One run of the reference, in a fresh process with START_ENV (main has checked that it has cfg.model)."""
    proc = subprocess.run([sys.executable, script, "--model", TORCH_NAMES[cfg.model], "--mode", mode, "--batch-size",
                           str(cfg.batch_size), "--image-size", str(cfg.image_size), "--num-classes",
                           str(cfg.num_classes)], capture_output=True, text=True, env=START_ENV)
    if proc.returncode != 0:
        raise UserError(f"the PyTorch reference failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''} "
                        "(pip install torch==2.13.0)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mindcv_env(ours: dict[str, str]) -> dict[str, str]:
    """The CPU settings this package's side ran with that mindcv's side gets on top of START_ENV."""
    return {name: ours[name] for name in SHARED_CPU_VARIABLES if name in ours}


def mindcv_reference(cfg: Config, args: argparse.Namespace, ours: dict[str, str]) -> dict:
    """One run of tools/mindcv_reference.py in a fresh process: START_ENV with this package's CPU settings."""
    proc = subprocess.run([sys.executable, str(MINDCV_SCRIPT), "--model", MINDCV_NAMES[cfg.model], "--mode", args.mode,
                           "--batch-size", str(cfg.batch_size), "--image-size", str(cfg.image_size), "--num-classes",
                           str(cfg.num_classes), "--steps", str(args.steps), "--warmup", str(args.warmup)],
                          capture_output=True, text=True, env={**START_ENV, **_mindcv_env(ours)})
    if proc.returncode != 0:
        raise UserError(f"the mindcv reference failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''} "
                        "(pip install -r requirements-dev.txt installs mindcv 0.3.0)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env_text(env: dict[str, str]) -> str:
    return " ".join(f"{name}={value}" for name, value in env.items()) or "none"


def main(argv: Sequence[str]) -> int:
    cfg, args = parse_command_line(argv, "benchmark", __doc__, add_arguments=_arguments)
    if args.worker:
        return worker(cfg, args)
    args.mindcv_reference = args.mindcv_reference in ("True", "true", "1")
    if args.rounds < 1 or (args.rounds > 1 and (not (args.torch_reference or args.mindcv_reference)
                                                or args.mode == "data")):
        raise UserError("--rounds needs --torch_reference or --mindcv_reference True, and --mode train or infer, "
                        "and must be at least 1")
    if args.mindcv_reference and (args.mode == "data" or cfg.model not in MINDCV_NAMES):
        raise UserError(f"--mindcv_reference times a net: mindcv has {', '.join(MINDCV_NAMES)} (not "
                        f"{cfg.model if args.mode != 'data' else 'the data pipeline'})")
    if args.mode == "train" and (cfg.gradient_accumulation_steps > 1 or cfg.mixes):
        raise UserError("--mode train times the train step on one fixed batch of int labels: "
                        "--gradient_accumulation_steps, --mixup and --cutmix do not apply (drop them; --mode data "
                        "times the pipeline with mixing)")
    if args.mode == "data" and not cfg.dataset_path:
        raise UserError("--mode data needs --dataset_path (the data set to read, with --dataset and its keys as "
                        "train.py takes them)")
    if args.torch_reference and args.mode != "data" and cfg.model not in TORCH_NAMES:
        raise UserError(f"the PyTorch reference has no {cfg.model} (it has {', '.join(TORCH_NAMES)})")
    if args.torch_reference and not Path(args.torch_reference).is_file():
        raise UserError(f"--torch_reference {args.torch_reference} is not a file (pass the path of "
                        "shared/bench/torch_reference.py)")
    side = _Worker(argv)
    try:
        return _report(cfg, args, side)
    except _WorkerEnded as ended:
        if ended.code < 0:  # killed by a signal, so it could not say why itself
            print(f"error: this project's timing process was killed by {signal.Signals(-ended.code).name} "
                  "(out of memory? see dmesg; then run the benchmark again)", file=sys.stderr)
            return 128 - ended.code
        return ended.code or 1  # it printed its own error line on our stderr
    finally:
        side.close()


def _report(cfg: Config, args: argparse.Namespace, side: _Worker) -> int:
    result = side.result()
    result = {"model": cfg.model if args.mode != "data" else None, "mode": args.mode, "batch_size": cfg.batch_size,
              "image_size": cfg.image_size, "amp_level": cfg.amp_level, **result}
    print(f"{args.mode} {result['model'] or cfg.dataset_path}: {result['img_per_s']:.2f} images/s, median step "
          f"{result['median_step_s'] * 1000:.1f} ms, time to first step {result['compile_s']:.1f} s"
          f"{' (compile cache: ' + result['compile_cache'] + ')' if 'compile_cache' in result else ''}, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    threads = result["threads"]
    kernels = f", C++ kernels {threads['cpp_kernels_openmp']} OpenMP" if threads["cpp_kernels_openmp"] else ""
    print(f"this project: {threads['process']} threads (MindSpore runtime {threads['mindspore_runtime']}{kernels}); "
          f"thread variables: {_env_text(result['env'])}", flush=True)
    if "per_image_ms" in result:
        print(f"decode + augment: {result['per_image_ms']:.2f} ms of CPU per image ({result['workers']} workers); "
              f"the {result['dataset']} data set check took {result['check_s']:.2f} s")
    references = []
    if args.torch_reference and args.mode != "data":
        references.append("torch")
    if args.mindcv_reference:
        references.append("mindcv")
    ours, idle, runs = [result["img_per_s"]], [], {name: [] for name in references}
    for i in range(args.rounds if references else 0):
        if i > 0:
            ours.append(side.again()["img_per_s"])
        for name in references:
            before = side.cpu_s()
            ref = torch_reference(args.torch_reference, cfg, args.mode) if name == "torch" else \
                mindcv_reference(cfg, args, result["env"])
            idle.append(side.cpu_s() - before)
            runs[name].append((ref, ours[-1] / ref["img_per_s"]))
            what = f"PyTorch {ref['torch']} eager ({ref['layout']}, {ref.get('threads', '?')} threads)" \
                if name == "torch" else f"mindcv {ref['mindcv']} {ref['model']} (first step {ref['compile_s']:.1f} s)"
            print(f"{what}: {ref['img_per_s']:.2f} images/s; this project {ours[-1]:.2f} images/s; ratio "
                  f"{runs[name][-1][1]:.2f}x", flush=True)
    if "torch" in runs:
        refs, ratios = zip(*runs["torch"])
        result.update(torch_img_per_s=statistics.median(r["img_per_s"] for r in refs),
                      ratio_vs_torch=statistics.median(ratios), torch_threads=refs[-1].get("threads"),
                      torch_env=thread_env(START_ENV.get))
        print(f"PyTorch's thread variables: {_env_text(result['torch_env'])}", flush=True)
        if args.rounds > 1:
            result["ratios"] = list(ratios)
            print(f"median ratio over {args.rounds} alternating rounds: {result['ratio_vs_torch']:.2f}x "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    if "mindcv" in runs:
        refs, ratios = zip(*runs["mindcv"])
        result.update(mindcv_img_per_s=statistics.median(r["img_per_s"] for r in refs),
                      ratio_vs_mindcv=statistics.median(ratios), mindcv_ratios=list(ratios),
                      mindcv_compile_s=statistics.median(r["compile_s"] for r in refs),
                      mindcv_env=_mindcv_env(result["env"]))
        print(f"median ratio to mindcv over {args.rounds} rounds: {result['ratio_vs_mindcv']:.2f}x "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    if idle:
        result["idle_worker_cpu_s"] = round(max(idle), 2)
        print(f"this project's idle worker used {max(idle):.2f} s of CPU while the references ran", flush=True)
    if args.json in ("True", "true", "1"):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
