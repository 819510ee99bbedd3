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
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from src.config import Config, parse_command_line
from src.device import prepare_cpu_threads
from src.errors import UserError, run_cli
from src.logs import quiet_mindspore

TORCH_NAMES = {"mobilenetv2": "mobilenet_v2", "resnet50": "resnet50", "mobilenetv3_large": "mobilenet_v3_large"}


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("train", "infer", "data"), default="train")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (batches for --mode data)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--json", default="False", choices=("True", "False", "true", "false", "1", "0"))
    parser.add_argument("--torch_reference", default=None, help="path of shared/bench/torch_reference.py")
    parser.add_argument("--rounds", type=int, default=1, help="alternating timings of this project and the reference")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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

    from src.device import setup_device
    from src.engine.lr_schedule import build_lr_schedule
    from src.engine.train_step import build_train_step, inference_cell
    from src.models import net_from_config

    setup_device(cfg)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((cfg.batch_size, 3, cfg.image_size, cfg.image_size)).astype(np.float32))
    y = ms.Tensor(rng.integers(0, cfg.num_classes, cfg.batch_size).astype(np.int32))
    net = net_from_config(cfg)
    if mode == "train":
        # one LR value per step the optimizer will take (the schedule is indexed by the global step)
        lr = build_lr_schedule("cosine", 0.0, 0.01, 0.0, 0, 1, 1 + warmup + steps * rounds)
        train_step, _ = build_train_step(net, cfg, lr)

        def step():
            train_step(x, y)[0].asnumpy()
    else:
        net.set_train(False)
        infer = inference_cell(net, cfg)

        def step():
            infer(x).asnumpy()
    compile_s, times = _time_steps(step, steps, warmup)
    median = statistics.median(times)
    return {"img_per_s": cfg.batch_size / median, "median_step_s": median, "compile_s": compile_s, "step": step}


def bench_data(cfg: Config, steps: int, warmup: int) -> dict:
    from src.data.checks import check_dataset
    from src.data.pipeline import create_dataset

    if not cfg.dataset_path:
        raise UserError("--mode data needs --dataset_path (a folder with train/<class>/ images)")
    source = check_dataset(cfg, need_train=True, need_val=False)
    data = create_dataset(cfg, source, training=True).repeat()  # endless, so any --steps fits
    iterator = data.create_tuple_iterator(output_numpy=True, num_epochs=1)
    compile_s, times = _time_steps(lambda: next(iterator), steps, warmup)
    median = statistics.median(times)
    workers = min(cfg.num_parallel_workers, os.cpu_count() or 1)
    img_per_s = cfg.batch_size / median
    return {"img_per_s": img_per_s, "median_step_s": median, "compile_s": compile_s,
            "per_image_ms": 1000 * workers / img_per_s, "workers": workers}


def torch_reference(script: str, cfg: Config, mode: str) -> dict:
    name = TORCH_NAMES.get(cfg.model)
    if name is None:
        raise UserError(f"the PyTorch reference has no {cfg.model} (it has {', '.join(TORCH_NAMES)})")
    proc = subprocess.run([sys.executable, script, "--model", name, "--mode", mode, "--batch-size",
                           str(cfg.batch_size), "--image-size", str(cfg.image_size), "--num-classes",
                           str(cfg.num_classes)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"the PyTorch reference failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''} "
                        "(pip install torch==2.13.0)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str]) -> int:
    cfg, args = parse_command_line(argv, "benchmark", __doc__, add_arguments=_arguments)
    quiet_mindspore()
    prepare_cpu_threads(cfg.platform)
    if args.rounds < 1 or (args.rounds > 1 and (not args.torch_reference or args.mode == "data")):
        raise UserError("--rounds needs --torch_reference and --mode train or infer, and must be at least 1")
    if args.mode == "data":
        result = bench_data(cfg, args.steps, args.warmup)
    else:
        result = bench_net(cfg, args.mode, args.steps, args.warmup, args.rounds)
    step = result.pop("step", None)
    result = {"model": cfg.model if args.mode != "data" else None, "mode": args.mode, "batch_size": cfg.batch_size,
              "image_size": cfg.image_size, "amp_level": cfg.amp_level, **result, "peak_rss_mb": peak_rss_mb()}
    print(f"{args.mode} {result['model'] or cfg.dataset_path}: {result['img_per_s']:.2f} images/s, median step "
          f"{result['median_step_s'] * 1000:.1f} ms, time to first step {result['compile_s']:.1f} s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    if "per_image_ms" in result:
        print(f"decode + augment: {result['per_image_ms']:.2f} ms of CPU per image ({result['workers']} workers)")
    if args.torch_reference:
        ratios, ours, theirs = [], [result["img_per_s"]], []
        for i in range(args.rounds):
            if i > 0:
                ours.append(cfg.batch_size / statistics.median(_timed(step, args.steps)))
            ref = torch_reference(args.torch_reference, cfg, args.mode)
            theirs.append(ref["img_per_s"])
            ratios.append(ours[-1] / theirs[-1])
            print(f"PyTorch {ref['torch']} eager ({ref['layout']}): {ref['img_per_s']:.2f} images/s; this project "
                  f"{ours[-1]:.2f} images/s; ratio {ratios[-1]:.2f}x", flush=True)
        result["torch_img_per_s"] = statistics.median(theirs)
        result["ratio_vs_torch"] = statistics.median(ratios)
        if args.rounds > 1:
            result["ratios"] = ratios
            print(f"median ratio over {args.rounds} alternating rounds: {result['ratio_vs_torch']:.2f}x "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    if args.json in ("True", "true", "1"):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
