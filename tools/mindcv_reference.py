"""mindcv 0.3.0 (MindSpore's own model library) timed the way ../shared/bench/torch_reference.py times PyTorch.

  python tools/mindcv_reference.py --model mobilenet_v2_100 --mode train --batch-size 32 --image-size 224

The same train step as the PyTorch reference (SGD, momentum 0.9, weight decay 4e-5, cross-entropy with label
smoothing 0.1) built as mindcv's train.py builds it at amp_level O0 (mindcv.create_loss, mindcv.create_optimizer,
one nn.TrainOneStepCell), in graph mode on CPU; inference: the net in eval mode. benchmark.py --mindcv_reference
True runs it in a fresh process with the CPU settings this package's own run has (ONEDNN_MAX_CPU_ISA, the thread
variables), so the two MindSpore sides differ only in the net and the step. One JSON line: images/s from the median
step after the warm-up, the time to the first step (compile), the thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import time

MODELS = ("mobilenet_v2_100", "mobilenet_v3_large_100", "mobilenet_v3_small_100", "resnet50", "resnet101")


def time_one(name: str, mode: str, batch: int, size: int, steps: int, warmup: int, num_classes: int) -> dict:
    import mindspore as ms
    import numpy as np
    from mindcv import create_loss, create_model, create_optimizer
    from mindspore import nn

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((batch, 3, size, size)).astype(np.float32))
    y = ms.Tensor(rng.integers(0, num_classes, batch).astype(np.int32))
    net = create_model(name, num_classes=num_classes, pretrained=False)
    if mode == "train":
        loss = create_loss(name="CE", label_smoothing=0.1)
        opt = create_optimizer(net.trainable_params(), opt="momentum", lr=0.01, momentum=0.9, weight_decay=4e-5)
        cell = nn.TrainOneStepCell(nn.WithLossCell(net, loss), opt).set_train(True)

        def step():
            cell(x, y).asnumpy()
    else:
        net.set_train(False)

        def step():
            net(x).asnumpy()
    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    return {"img_per_s": batch / median, "median_step_s": median, "compile_s": compile_s,
            "runtime_threads": ms.get_context("runtime_num_threads")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="mobilenet_v2_100")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=1000)
    a = p.parse_args()
    os.environ.setdefault("GLOG_v", "3")
    import mindcv

    result = time_one(a.model, a.mode, a.batch_size, a.image_size, a.steps, a.warmup, a.num_classes)
    print(json.dumps({"model": a.model, "mode": a.mode, "batch_size": a.batch_size, "image_size": a.image_size,
                      "mindcv": mindcv.__version__, "isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), **result}))


if __name__ == "__main__":
    main()
