"""Time ONNX models in onnxruntime on the CPU: images/s at each batch size, and the ratio of each model to the first.

    python tools/bench_onnx.py output/mobilenetv2.onnx output/qat/mobilenetv2.onnx --batch_sizes 1,32 --rounds 3

Made for comparing the float export of a net with its int8 QDQ export (export.py --pact_quant True). Each timing
runs in a fresh process with the environment this command was started with (onnxruntime's default threads: one
per physical core), on random input of the model's image size: a session is created with onnxruntime's full
graph optimisation, warmed up with --warmup runs, then --steps runs are timed and their median is kept. The rounds
alternate the models, and the ratio is the median over rounds. Also printed, for each model, what onnxruntime
turned the graph into (its operator counts after optimisation): an int8 model only runs faster when its Conv and
Gemm nodes became QLinearConv / MatMulInteger-style integer operators. The last line is one JSON object.
"""
from __future__ import annotations

import os

START_ENV = dict(os.environ)

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def time_model(path: str, batch: int, steps: int, warmup: int) -> dict:
    """One timing in this process: images/s (median of `steps` runs) and the optimised graph's operator counts."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        ops = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    shape = session.get_inputs()[0].shape
    x = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)
    name = session.get_inputs()[0].name
    for _ in range(warmup):
        session.run(None, {name: x})
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return {"img_per_s": batch / statistics.median(times), "ops": dict(ops.most_common())}


def _in_fresh_process(path: str, batch: int, steps: int, warmup: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--time", path, "--batch", str(batch), "--steps", str(steps),
                           "--warmup", str(warmup)], capture_output=True, text=True, env=START_ENV)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
        raise SystemExit(f"error: timing {path} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="ONNX files; ratios are to the first")
    parser.add_argument("--batch_sizes", default="1,32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--time", help=argparse.SUPPRESS)  # one timing, in the fresh process
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time:
        print(json.dumps(time_model(args.time, args.batch, args.steps, args.warmup)))
        return 0
    if not args.models or any(not Path(m).is_file() for m in args.models):
        missing = [m for m in args.models if not Path(m).is_file()]
        print(f"error: ONNX file not found: {', '.join(missing) or 'none given'} (export with python export.py "
              "--file_format ONNX)", file=sys.stderr)
        return 2
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1 or min(args.steps, args.rounds) < 1 or args.warmup < 0:
        print(f"error: --batch_sizes {args.batch_sizes}, --steps {args.steps}, --rounds {args.rounds}, --warmup "
              f"{args.warmup}: need positive integers (e.g. --batch_sizes 1,32; --warmup may be 0)", file=sys.stderr)
        return 2
    report = []
    for batch in batches:
        speeds = {m: [] for m in args.models}
        ops = {}
        for _ in range(args.rounds):
            for model in args.models:
                timing = _in_fresh_process(model, batch, args.steps, args.warmup)
                speeds[model].append(timing["img_per_s"])
                ops[model] = timing["ops"]
        first = args.models[0]
        for model in args.models:
            ratios = [s / f for s, f in zip(speeds[model], speeds[first])]
            row = {"model": model, "batch": batch, "img_per_s": statistics.median(speeds[model]),
                   "ratio_to_first": statistics.median(ratios), "ratios": ratios, "ops": ops[model]}
            report.append(row)
            top = ", ".join(f"{op} {n}" for op, n in list(ops[model].items())[:8])
            print(f"batch {batch}: {model}: {row['img_per_s']:.1f} images/s (median of {args.rounds} rounds), "
                  f"{row['ratio_to_first']:.2f}x the first (range {min(ratios):.2f}-{max(ratios):.2f}); "
                  f"after onnxruntime's optimisation: {top}", flush=True)
    import onnxruntime

    print(json.dumps({"onnxruntime": onnxruntime.__version__, "rows": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
