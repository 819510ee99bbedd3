"""Fast CPU kernels: C++ loops run by MindSpore as ops.Custom AOT operators.

MindSpore 2.10 runs grouped convolutions on CPU through oneDNN's im2col + GEMM per group on plain NCHW tensors,
its CPU BatchNorm/BatchNormGrad take 2-3x longer than two passes over each channel, and its ReduceMean gradient is
a Tile + RealDiv; in MobileNetV2/V3 training those take most of every step (docs/performance.md).
`fast_cpu_kernels` points the depthwise nn.Conv2d layers of a net at depthwise.cc, the batch-statistics path of
its nn.BatchNorm2d layers at batchnorm.cc and its GlobalAvgPooling cells at pooling.cc: same Parameters and names
(checkpoints are unchanged), same numbers within float32 rounding (tests/test_kernels.py), forward and gradients,
running statistics updated as MindSpore does.

The library is compiled on first use with the system C++ compiler (g++ -O3 -march=native -fopenmp, ~3 s) into
~/.cache/mindspore-classification/ keyed by the sources, the compiler and the CPU, and reused afterwards. Without
a compiler the net keeps MindSpore's kernels and one line says how to get the fast path. Export, evaluation-mode
BatchNorm and GPU/Ascend never use it. optim.cc holds one-pass updates for the optimizers src/engine/optimizer.py
writes itself (rmsprop, rmsproptf, adam, adamw, lamb), which use them on CPU. CLS_CPU_KERNELS=mindspore turns all of
it off; CLS_CPU_KERNELS=depthwise,pooling (any subset of KINDS and "optim") keeps only those.
"""
from src.models.kernels.build import KernelUnavailable, build_library
from src.models.kernels.cpu import KINDS, SWITCH, fast_cpu_kernels, kernel_threads, use_fast_kernels

__all__ = ["KINDS", "SWITCH", "KernelUnavailable", "build_library", "fast_cpu_kernels", "kernel_threads",
           "use_fast_kernels"]
