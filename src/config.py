"""YAML + command line -> one validated, immutable Config.

Every field of `Config` is a YAML key and a `--key value` flag. A YAML file (chosen with
`--config_path`, default configs/demo.yaml) only sets the defaults; flags override it. Unknown keys
or flags, wrong types, out-of-range values and bad choices raise UserError naming the valid options.
Built inside main(), never at import time.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from src.errors import UserError, show_tracebacks
from src.files import write_atomically
from src.models.registry import canonical_name, cards, model_card
from src.policy import parse_policy

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"
MODEL_NAMES = tuple(cards())  # every registered net (src/models/*/__init__.py), read without loading MindSpore
# other spellings users bring from the PaddleClas / torchvision / timm / Ascend ModelZoo seeds and recipes, e.g.
# `--data-path=./ILSVRC2012 --lr=0.001 --batch-size=64 --epochs=10 --pretrained=x.ckpt --pact_quant`, and the
# PyTorch MobileNetV3 seed's `--arch mobilenet_v3_large --data /imagenet --lr-step-size 2 --lr-gamma 0.973 --apex`
ALIASES = {"lr_max": ("lr", "learning-rate"), "epoch_size": ("epochs",),
           "dataset_path": ("data-path", "data_path", "data"), "model": ("arch",),
           "batch_size": ("batch-size",), "pretrain_ckpt": ("pretrained",), "num_parallel_workers": ("workers",),
           "print_freq": ("print-freq",), "weight_decay": ("wd", "weight-decay"),
           "lr_step_size": ("lr-step-size", "decay-epochs"), "lr_gamma": ("lr-gamma", "decay-rate"),
           "max_steps": ("max-steps",), "label_smooth": ("label-smoothing", "smoothing"),
           "drop_path_rate": ("drop-path",), "eps": ("opt-eps",), "dropout": ("drop",),
           "re_prob": ("random-erase", "reprob"), "auto_augment": ("auto-augment", "aa"),
           "warmup_epochs": ("warmup-epochs", "lr-warmup-epochs"), "lr_init": ("warmup-lr",),
           "ema": ("model-ema",), "ema_decay": ("model-ema-decay",), "lr_decay_mode": ("sched",),
           "lr_milestones": ("decay-milestones",),
           "mixup_prob": ("cutmix_prob",)}  # mindcv's name for the probability of mixing a batch
# the seed's mixed precision: --apex [--apex-opt-level O1|O2|O3] (apex's levels; O1 its default) sets amp_level and,
# on GPU/Ascend, apex's dynamic loss scaling
APEX_DEFAULT_LEVEL = "O1"
APEX_LOSS_SCALE = 2.0 ** 16  # apex's dynamic loss scale starts there (amp's LossScaler init_scale)
AMP_LEVELS = ("O0", "O1", "O2", "O3")
# One file per tool, three spellings in the peers' scripts: on each tool the flags of the first key set the
# second (eval.py reads its checkpoint from --pretrain_ckpt as in the ModelZoo, export.py and predict.py from
# --ckpt_file; each takes the other spelling too). The first key keeps its YAML value.
TOOL_FLAGS = {
    "train": {},
    "eval": {"ckpt_file": "pretrain_ckpt"},
    "export": {"pretrain_ckpt": "ckpt_file"},
    "predict": {"pretrain_ckpt": "ckpt_file"},
    "eval_onnx": {"file_name": "onnx_file"},
    "benchmark": {},
    "convert": {},
}
# values a tool uses unless the command line says otherwise (over the YAML's)
TOOL_DEFAULTS = {
    "export": {"batch_size": 1},
    "benchmark": {"num_classes": 1000, "image_size": 224, "batch_size": 32, "dataset_path": "", "amp_level": "O0"},
}
DATASETS = ("imagefolder", "cifar10", "list", "csv", "mindrecord")  # the readers of src/data/checks.py
# the keys of some data set formats only: refused with the others
DATASET_KEYS = {"list": ("train_list", "val_list", "class_names"),
                "csv": ("train_csv", "val_csv", "csv_image_column", "csv_label_column", "class_names")}
# the optimizers (engine/optimizer.py) by family: SGD's (MindSpore's nn.Momentum / nn.SGD), RMSProp's, Adam's
SGD_FAMILY, RMSPROP_FAMILY, ADAM_FAMILY = ("sgd", "momentum", "nesterov"), ("rmsprop", "rmsproptf"), \
    ("adam", "adamw", "lamb")
OPTIMIZERS = (*SGD_FAMILY, *RMSPROP_FAMILY, *ADAM_FAMILY)
DEFAULT_EPS = {"rmsprop": 1e-8, "rmsproptf": 1e-10, "adam": 1e-8, "adamw": 1e-8, "lamb": 1e-6}  # each source's
LR_SCHEDULES = ("cosine", "steps", "poly", "linear", "step", "multistep", "exponential")  # engine/lr_schedule.py
# the schedule keys that shape only some modes' curves: refused with the others, not compared on resume by them
MODE_KEYS = {"step": ("lr_step_size", "lr_gamma", "lr_step_per_epoch"),
             "multistep": ("lr_milestones", "lr_gamma", "lr_step_per_epoch"),
             "exponential": ("lr_gamma", "lr_step_per_epoch"), "cosine": ("num_cycles", "cycle_decay")}
TRACKERS = ("tensorboard", "mlflow")  # engine/trackers.py
MLFLOW_KEYS = ("mlflow_uri", "mlflow_experiment", "mlflow_run_name")
TRUE_WORDS = ("True", "true", "1")
_NOT_GIVEN = object()  # argparse default: tells a flag on the command line from a YAML value
FALSE_WORDS = ("False", "false", "0")


_section = ["model and data"]


def _begin(title: str) -> None:
    """Inside Config: the keys that follow belong to section `title` (--help and docs/config.md group by it)."""
    _section[0] = title


def _opt(default: Any, help: str, choices: Sequence[str] | None = None,
         min: float | None = None, max: float | None = None, nullable: bool = False) -> Any:
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max,
            "nullable": nullable, "section": _section[0]}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    """Every option of train.py, eval.py and benchmark-style tools; names follow the ModelZoo."""

    _begin("model and data")
    model: str = _opt("mobilenetv2", "network", choices=MODEL_NAMES)
    dataset: str = _opt("imagefolder", "dataset format: imagefolder (train/ and val/ class folders), cifar10 "
                        "(binary batches), list (PaddleClas label lists: 'path label' lines), csv (a file name and a "
                        "label column) or mindrecord (shards of tools/convert_to_mindrecord.py)", choices=DATASETS)
    dataset_path: str = _opt("", "dataset root; relative paths that do not exist from the current folder "
                             "are looked up in the package folder (the demo's data/digits)")
    train_list: str = _opt("train_list.txt", "list: the train label list, lines 'relative/path.jpg label' (integer "
                           "labels from 0; paths relative to dataset_path; the file itself in dataset_path or given "
                           "by its path)")
    val_list: str = _opt("val_list.txt", "list: the val label list (as train_list)")
    train_csv: str = _opt("train.csv", "csv: the train labels, a header line naming csv_image_column and "
                          "csv_label_column; image paths relative to the CSV's folder (Hugging Face's metadata.csv)")
    val_csv: str = _opt("val.csv", "csv: the val labels (as train_csv)")
    csv_image_column: str = _opt("file_name", "csv: the column of image paths")
    csv_label_column: str = _opt("label", "csv: the column of labels: class names, or integers from 0")
    class_names: str | None = _opt(None, "list, csv: a file of the class names in label order, one per line (or "
                                   "PaddleClas's 'id name' lines); default: the sorted names of a csv's labels, "
                                   "else the label numbers", nullable=True)
    num_classes: int = _opt(10, "number of classes (must equal the class folders found)", min=2)
    image_size: int = _opt(32, "network input size in pixels", min=16, max=1024)
    width: float = _opt(1.0, "MobileNet width multiplier (channels rounded to multiples of 8)", min=0.1, max=4.0)
    dropout: float = _opt(0.0, "dropout before the classifier", min=0.0, max=0.9)
    bn_eps: float | None = _opt(None, "BatchNorm epsilon (default: the net's own, 1e-3 for the MobileNetV3s and 1e-5 "
                                "for the others; a checkpoint's or published layout's value is taken from it)",
                                min=1e-10, max=0.1, nullable=True)
    padding: str = _opt("symmetric", "the padding convention of the weights (taken from the checkpoint): symmetric "
                        "(k-1)/2 as torchvision; mindcv (MindSpore's 'same' rule on MobileNetV3's depthwise "
                        "convolutions and ResNet's stem max pooling); modelzoo ('same' on ResNet's strided "
                        "convolutions too)", choices=("symmetric", "mindcv", "modelzoo"))

    _begin("device and run")
    platform: str = _opt("CPU", "device to run on", choices=("CPU", "GPU", "Ascend"))
    device_id: int = _opt(0, "device index on GPU/Ascend (distributed runs take DEVICE_ID from the launcher)",
                          min=0, max=15)
    run_distribute: bool = _opt(False, "data-parallel training across the processes started by "
                                "scripts/run_train.sh (set by the script)")
    output_path: str = _opt("./output", "folder for checkpoints, logs, metrics and curves")
    seed: int = _opt(1, "random seed (numpy, mindspore, dataset)", min=0, max=2**32 - 1)
    debug: bool = _opt(False, "show tracebacks for user errors")
    fingerprint_data: bool = _opt(False, "debugging: hash every training batch on the host and log the digest at "
                                  "the end (shows each rank of a distributed run read its own shard; costs host time "
                                  "every step)")
    dataset_sink_mode: bool = _opt(False, "Ascend/GPU: MindSpore's data sinking, batches go through a device queue and "
                                   "sink_size steps run per call, hiding host-device copies (CPU does not sink; "
                                   "the run says so and goes on unsunk)")
    sink_size: int = _opt(-1, "steps per sink with dataset_sink_mode (-1: one epoch; else a divisor of the steps per "
                          "epoch); the log line, train top-1/top-5 and a Ctrl-C come once per sink", min=-1)
    max_steps: int = _opt(0, "stop after N optimizer steps of this run and print the throughput (the PyTorch seed's "
                          "performance mode; 0: train every epoch); an epoch cut short writes no files", min=0)
    compile_cache: str = _opt("auto", "where compiled graphs are kept for a rerun of the same configuration on the "
                              "same data (a resume, a restart, the same recipe with other paths or LR values): auto "
                              "($CLS_CACHE_DIR/compile, default ~/.cache/mindspore_cls/compile), a folder, or none")
    _begin("data pipeline and augmentation")
    batch_size: int = _opt(32, "batch size per device", min=1, max=8192)
    num_parallel_workers: int = _opt(2, "data pipeline workers", min=1, max=64)
    sampler: str = _opt("shuffle", "training order: shuffle (every image once per epoch) or balanced (each epoch draws "
                        "classes equally, with replacement, as many images as the split holds; deterministic per "
                        "seed, epoch and rank)", choices=("shuffle", "balanced"))
    crop_scale_min: float = _opt(0.08, "smallest area fraction of the random resized crop", min=0.01, max=1.0)
    random_flip: float = _opt(0.5, "probability of a horizontal flip (0 disables)", min=0.0, max=1.0)
    color_jitter: float = _opt(0.0, "brightness/contrast/saturation jitter strength (0 disables)",
                               min=0.0, max=1.0)
    auto_augment: str | None = _opt(None, "augmentation policy after the crop and flip, instead of colour jitter: "
                                    "autoaug, randaug-mM[-nN][-mstdS][-inc1] (timm's grammar, e.g. "
                                    "randaug-m9-mstd0.5-inc1) or trivialaugwide", nullable=True)
    re_prob: float = _opt(0.0, "random erasing probability, on the normalised image (area 0.02..1/3 of the image, "
                          "as mindcv and timm)",
                          min=0.0, max=1.0)
    mixup: float = _opt(0.0, "mixup alpha: each train batch is mixed with its mirror image, lam ~ Beta(alpha, alpha), "
                        "targets mixed alike (0 disables; timm/mindcv use 0.2..0.8)", min=0.0, max=100.0)
    cutmix: float = _opt(0.0, "cutmix alpha: a box of area 1 - lam from the mirrored batch image is pasted in, "
                         "targets by pixel share (0 disables; timm/mindcv use 1.0)", min=0.0, max=100.0)
    mixup_prob: float = _opt(1.0, "probability that a batch is mixed (mixup or cutmix)", min=0.0, max=1.0)
    mixup_switch_prob: float = _opt(0.5, "with both mixup and cutmix: probability of cutmix for a batch",
                                    min=0.0, max=1.0)
    mixup_off_epoch: int = _opt(0, "no mixing after this epoch (timm's; 0: mix to the end)", min=0)
    mean: str | None = _opt(None, "per-channel mean of the input normalization, 0..1 units, e.g. 0.485,0.456,0.406 "
                            "(default: the checkpoint's, else ImageNet's, CIFAR-10's for cifar10)", nullable=True)
    std: str | None = _opt(None, "per-channel standard deviation, 0..1 units (default as mean)", nullable=True)
    crop_pct: float | None = _opt(None, "eval crop: resize to image_size / crop_pct, then center-crop image_size "
                                  "(default: the checkpoint's, else 0.875 = 224/256)", min=0.1, max=1.0,
                                  nullable=True)
    interpolation: str | None = _opt(None, "resize interpolation (default: the checkpoint's, else bilinear)",
                                     choices=("bilinear", "bicubic"), nullable=True)
    _begin("optimisation")
    epoch_size: int = _opt(30, "number of epochs", min=1)
    opt: str = _opt("momentum", "optimizer: momentum (MindSpore's Momentum, the ModelZoo's), nesterov, sgd "
                    "(PyTorch's SGD with --momentum), rmsprop (PyTorch's: eps outside the square root), rmsproptf "
                    "(TensorFlow's and timm's RMSpropTF: eps inside it), adam, adamw (decoupled weight decay, "
                    "PyTorch's), lamb", choices=OPTIMIZERS)
    momentum: float = _opt(0.9, "momentum of momentum, nesterov, sgd, rmsprop and rmsproptf", min=0.0, max=1.0)
    nesterov: bool = _opt(False, "Nesterov momentum for sgd and momentum (--opt nesterov sets it)")
    weight_decay: float = _opt(4e-5, "weight decay (L2 added to the gradient; adamw and lamb decouple it)", min=0.0)
    filter_bias_and_bn: bool = _opt(True, "no weight decay on BatchNorm parameters and biases (mindcv's and timm's "
                                    "default; False decays every parameter)")
    eps: float | None = _opt(None, "optimizer epsilon (default: the optimizer's own: " + ", ".join(
        f"{name} {value:g}" for name, value in DEFAULT_EPS.items()) + ")", min=1e-12, max=10.0, nullable=True)
    rmsprop_alpha: float = _opt(0.9, "smoothing constant of the mean square in rmsprop and rmsproptf (torchvision's "
                                "and timm's MobileNetV3 recipes use 0.9; torch.optim's default is 0.99)",
                                min=0.0, max=0.999999)
    beta1: float = _opt(0.9, "adam, adamw and lamb: decay of the first moment", min=0.0, max=0.999999)
    beta2: float = _opt(0.999, "adam, adamw and lamb: decay of the second moment", min=0.0, max=0.999999)
    lr_decay_mode: str = _opt("cosine", "learning-rate schedule after warmup: cosine (with --num_cycles restarts), "
                              "steps (x0.1 at 30/60/80% of training, the ModelZoo's), poly, linear, step (x lr_gamma "
                              "every lr_step_size epochs), multistep (x lr_gamma at each of lr_milestones), "
                              "exponential (x lr_gamma per epoch)", choices=LR_SCHEDULES)
    lr_init: float = _opt(0.0, "learning rate at the start of warmup", min=0.0)
    lr_max: float = _opt(0.1, "peak learning rate (after warmup)", min=0.0)
    lr_end: float = _opt(0.0, "final learning rate (cosine, linear)", min=0.0)
    warmup_epochs: float = _opt(0.0, "epochs of linear warmup from lr_init to lr_max", min=0.0)
    lr_step_size: float = _opt(30.0, "step: epochs between decays, a fraction allowed (timm's 2.4; torchvision's "
                               "MobileNetV3 recipe uses 2)", min=1e-3)
    lr_gamma: float = _opt(0.1, "step, multistep and exponential: the decay factor", min=0.0, max=1.0)
    lr_milestones: str | None = _opt(None, "multistep: the epochs at which the LR is multiplied by lr_gamma, "
                                     "counted after warmup, e.g. 30,60,90", nullable=True)
    lr_step_per_epoch: bool = _opt(True, "step, multistep, exponential: the LR changes at epoch boundaries (torch's "
                                   "schedulers stepped per epoch, timm's default); False: at every optimizer step, "
                                   "from the fractional epoch")
    num_cycles: int = _opt(1, "cosine: cycles of the cosine, each restarting at the peak LR (mindcv's; torch's "
                           "CosineAnnealingWarmRestarts with equal cycles)", min=1)
    cycle_decay: float = _opt(1.0, "cosine with num_cycles > 1: the peak LR of each cycle is the previous one's "
                              "times this", min=0.0, max=1.0)
    label_smooth: float = _opt(0.1, "label smoothing factor", min=0.0, max=0.99)
    class_weights: str = _opt("none", "per-class loss weights: none, balanced (n_images / (n_classes x the class's "
                              "train images), scikit-learn's), a comma list of num_classes numbers, or a file of "
                              "them (one per line, or 'name weight' lines)")
    drop_path_rate: float = _opt(0.0, "stochastic depth: the largest probability of skipping a residual block, "
                                 "rising linearly with depth as timm's (MobileNetV2/V3, ResNet; off in eval and "
                                 "export; timm's MobileNetV3 recipe uses 0.2)", min=0.0, max=0.9)
    ema: bool = _opt(False, "keep an exponential moving average of the weights (every parameter, BatchNorm statistics "
                     "included, as mindcv) updated in the train step; evaluation during training, best.ckpt and "
                     "eval/export/fine-tuning from the run's checkpoints use it")
    ema_decay: float = _opt(0.9999, "EMA decay per optimizer step, warmed up as mindcv: decay * (1 - exp(-t / 2000)) "
                            "at step t", min=0.0, max=0.999999)
    clip_grad: bool = _opt(False, "clip the gradients' global norm (after loss-scale unscaling and averaging over "
                           "ranks, before the optimizer)")
    clip_value: float = _opt(15.0, "the global-norm bound of clip_grad", min=1e-6)
    gradient_accumulation_steps: int = _opt(1, "step the optimizer every N batches with their mean gradient (an "
                                            "effective batch of N x batch_size per device; the LR schedule, log and "
                                            "checkpoints count optimizer steps; BatchNorm still sees batches of "
                                            "batch_size)", min=1, max=1024)
    _begin("mixed precision and quantization")
    amp_level: str = _opt("O0", "mixed precision level", choices=AMP_LEVELS)
    pact_quant: bool = _opt(False, "PACT quantization-aware training: int8 fake-quantized weights (per channel) and "
                            "activations (PACT clip + moving-average scale); for train, eval and export")
    keep_batchnorm_fp32: bool = _opt(True, "keep BatchNorm in float32 at O2/O3")
    loss_scale_type: str = _opt("fixed", "loss scale manager (CPU supports fixed only)",
                                choices=("fixed", "dynamic"))
    loss_scale: float = _opt(1.0, "(initial) loss scale", min=1.0)
    drop_overflow_update: bool = _opt(False, "skip the update on overflow with a fixed loss scale (GPU/Ascend)")
    _begin("checkpoints, evaluation and fine-tuning")
    save_checkpoint_epochs: int = _opt(1, "save a checkpoint every N epochs", min=1)
    keep_checkpoint_max: int = _opt(5, "keep at most N periodic checkpoints", min=1)
    run_eval: bool = _opt(True, "evaluate on the val set during training and keep checkpoint/best.ckpt")
    eval_interval: int = _opt(1, "evaluate every N epochs", min=1)
    print_freq: int = _opt(20, "log the top1/top5/speed line every N steps", min=1)
    pretrain_ckpt: str | None = _opt(None, "checkpoint to start from (train) or to evaluate (eval; default: "
                                     "output_path/checkpoint/best.ckpt)", nullable=True)
    filter_head: bool = _opt(False, "drop the checkpoint's classifier before loading (fine-tune onto other classes)")
    freeze_layer: str = _opt("none", "backbone: train only the head, on backbone features cached under "
                             "output_path/feature_cache", choices=("none", "backbone"))
    resume_ckpt: str | None = _opt(None, "periodic checkpoint to resume from (net, optimizer, epoch, step), or auto: "
                                   "the newest whole one of this run in output_path/checkpoint (on ModelArts after "
                                   "fetching train_url's outputs), none there: a fresh start; the value a job that "
                                   "may be restarted should use", nullable=True)
    resume_data: str = _opt("fast", "a resumed run's data: fast (the following epochs read the images in the "
                            "uninterrupted run's order, with new random crops and flips) or exact (MindSpore replays "
                            "the pipeline over the epochs done, costing their data time again: bit-identical to the "
                            "uninterrupted run)", choices=("fast", "exact"))
    _begin("experiment tracking")
    tracker: str = _opt("none", "where the run's curves also go: none, tensorboard (event files in "
                        "output_path/tensorboard), mlflow, or both as tensorboard,mlflow (rank 0; train.log and "
                        "metrics.csv stay the record)")
    mlflow_uri: str | None = _opt(None, "mlflow: the tracking store, e.g. http://host:5000 or sqlite:///path.db "
                                  "(default: MLFLOW_TRACKING_URI, else the SQLite database output_path/mlflow.db)",
                                  nullable=True)
    mlflow_experiment: str = _opt("", "mlflow: the experiment name (default: the model's name)")
    mlflow_run_name: str = _opt("", "mlflow: the run name (default: the output folder's name)")
    _begin("ModelArts / OBS")
    enable_modelarts: bool = _opt(False, "copy data_url (and checkpoint_url) from OBS/S3 before training and "
                                  "upload output_path to train_url")
    data_url: str | None = _opt(None, "obs:// or s3:// URL of the data set (downloaded into dataset_path, "
                                "default /cache/data)", nullable=True)
    train_url: str | None = _opt(None, "obs:// or s3:// URL the outputs are uploaded to", nullable=True)
    checkpoint_url: str | None = _opt(None, "obs:// or s3:// URL of a checkpoint (file or folder) to use as "
                                      "pretrain_ckpt", nullable=True)
    _begin("export and deployment")
    ckpt_file: str | None = _opt(None, "checkpoint to export or predict with (default: "
                                 "output_path/checkpoint/best.ckpt)", nullable=True)
    file_name: str | None = _opt(None, "exported model path without extension (default: output_path/<model>)",
                                 nullable=True)
    file_format: str = _opt("MINDIR", "export format", choices=("MINDIR", "ONNX", "AIR"))
    onnx_file: str | None = _opt(None, "ONNX model for eval_onnx.py and predict.py (default: "
                                 "output_path/<model>.onnx for eval_onnx.py, else the one .onnx file in "
                                 "output_path)", nullable=True)

    def __post_init__(self) -> None:
        if isinstance(self.model, str) and self.model not in MODEL_NAMES and canonical_name(self.model):
            object.__setattr__(self, "model", canonical_name(self.model))  # torchvision's, mindcv's or timm's name
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name))
        if self.lr_init > self.lr_max and self.warmup_epochs > 0:
            raise UserError(f"lr_init {self.lr_init} is above lr_max {self.lr_max} "
                            "(warmup rises from lr_init to lr_max; lower --lr_init)")
        card = model_card(self.model)
        if not card.width_multiplier and self.width != 1.0:
            raise UserError(f"width applies to the MobileNets only (drop --width for {self.model})")
        if self.drop_path_rate > 0 and not card.drop_path:
            raise UserError(f"drop_path_rate applies to nets with stochastic depth, not {self.model} (drop "
                            "--drop_path_rate)")
        if self.freeze_layer == "backbone" and not (self.pretrain_ckpt or self.resume_ckpt):
            raise UserError("--freeze_layer backbone needs --pretrain_ckpt (a frozen random backbone learns nothing; "
                            "pass the checkpoint to fine-tune from)")
        if self.freeze_layer == "backbone" and self.mixes:
            raise UserError("--mixup/--cutmix mix images, and --freeze_layer backbone trains the head on cached "
                            "features of unaugmented images (drop --mixup/--cutmix, or use --freeze_layer none)")
        if self.pact_quant and self.freeze_layer == "backbone":
            raise UserError("--pact_quant True trains the whole net and cannot be combined with --freeze_layer "
                            "backbone (drop one of them)")
        for key in ("mean", "std"):
            if getattr(self, key) is not None:
                channel_values(getattr(self, key), key)
        if self.auto_augment is not None:
            parse_policy(self.auto_augment)
        if self.sink_size == 0:
            raise UserError("--sink_size got 0 (use -1 for one sink per epoch, or a number of steps)")
        if not self.compile_cache.strip():
            raise UserError("--compile_cache got an empty value (use auto, a folder for the compiled graphs, or none)")
        if self.fingerprint_data and self.dataset_sink_mode and self.platform != "CPU":
            raise UserError("--fingerprint_data True needs the batches on the host, which data sinking bypasses "
                            "(use --dataset_sink_mode False for that run)")
        _refuse_other_keys(self, "dataset", DATASET_KEYS)
        _check_trackers(self)
        if self.sampler == "balanced" and self.class_weights == "balanced":
            raise UserError("--class_weights balanced and --sampler balanced each counter the imbalance: together they "
                            "weigh rare classes up twice (use one of them)")
        if self.sampler == "balanced" and self.dataset == "mindrecord":
            raise UserError("--sampler balanced draws any image at any time, which MindSpore's MindRecord reader "
                            "cannot (it takes only its own samplers): use --class_weights balanced with mindrecord, "
                            "or the list/csv/imagefolder data it was converted from")
        if self.lr_decay_mode == "multistep" and self.lr_milestones is None:
            raise UserError("--lr_decay_mode multistep needs --lr_milestones, the epochs of each decay (e.g. "
                            "--lr_milestones 30,60,90)")
        _refuse_other_keys(self, "lr_decay_mode", MODE_KEYS)
        if self.lr_milestones is not None:
            object.__setattr__(self, "lr_milestones", ",".join(map(str, milestones(self.lr_milestones))))
        if self.nesterov and self.opt not in SGD_FAMILY:
            raise UserError(f"--nesterov applies to --opt sgd and momentum, not {self.opt} (drop --nesterov)")
        if self.eps is not None and self.opt in SGD_FAMILY:
            *others, last = DEFAULT_EPS
            raise UserError(f"--eps applies to {', '.join(others)} and {last}, not {self.opt} (drop --eps)")
        if (self.nesterov or self.opt == "nesterov") and self.momentum == 0:
            raise UserError("--nesterov True needs --momentum above 0 (Nesterov momentum without momentum is "
                            "plain SGD)")
        if self.image_size < card.min_image_size:
            raise UserError(f"image_size {self.image_size} is too small for {self.model} (use at least "
                            f"{card.min_image_size})")

    @property
    def optimizer_kind(self) -> str:
        """The optimizer that runs, by its state: momentum or sgd with --nesterov True is nesterov's (nn.SGD's)."""
        return "nesterov" if self.opt in SGD_FAMILY and self.nesterov else self.opt

    @property
    def mixes(self) -> bool:
        """Whether training mixes batches (mixup or cutmix)."""
        return self.mixup > 0 or self.cutmix > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        """dataclasses.replace that keeps which keys the command line set (given_on_command_line)."""
        new = dataclasses.replace(self, **changes)
        object.__setattr__(new, "_given", given_on_command_line(self))
        return new

    def resolved_dataset_path(self) -> Path:
        """The dataset folder: as given, or relative to the package when that is where it exists."""
        path = Path(os.path.expanduser(self.dataset_path))
        if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
            return ROOT / path
        return path


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _refuse_other_keys(cfg: Config, selector: str, table: dict[str, tuple[str, ...]]) -> None:
    """UserError for a key of `table` set (off its default) while `selector` (e.g. lr_decay_mode) is none of the
    values whose keys it is."""
    for key in {key: None for keys in table.values() for key in keys}:  # each once, in the table's order
        values = [value for value, keys in table.items() if key in keys]
        if getattr(cfg, key) != FIELDS[key].default and getattr(cfg, selector) not in values:
            how = f"use --{selector} {values[0]}" if len(values) == 1 else "use one of those"
            raise UserError(f"--{key} applies to --{selector} {' and '.join(values)}, not {getattr(cfg, selector)} "
                            f"({how}, or drop --{key})")


def _check_trackers(cfg: Config) -> None:
    names = list_items(cfg.tracker)
    unknown = [n for n in names if n not in TRACKERS + ("none",)]
    if unknown or not names or ("none" in names and len(names) > 1) or len(set(names)) < len(names):
        raise UserError(f"--tracker got {cfg.tracker!r} (use none, tensorboard, mlflow, or tensorboard,mlflow)")
    if "mlflow" not in names:
        for key in MLFLOW_KEYS:
            if getattr(cfg, key) != FIELDS[key].default:
                raise UserError(f"--{key} applies to --tracker mlflow, not {cfg.tracker} (add mlflow to --tracker, "
                                f"or drop --{key})")


def list_items(text: str) -> list[str]:
    """The items of a list written '1,2,3', '1 2 3' or '[1, 2, 3]' (a YAML list reaches here as its text)."""
    return [p for p in text.strip("[]() ").replace(",", " ").split() if p]


def channel_values(text: str, key: str) -> list[float]:
    """Three numbers, 0..1 units, from '0.485,0.456,0.406' (or '[0.485, 0.456, 0.406]'); UserError otherwise."""
    parts = list_items(text)
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    low = 0.0 if key == "mean" else 1e-6  # a standard deviation divides
    if len(values) != 3 or not all(low <= v <= 1 for v in values):
        raise UserError(f"--{key} got {text!r} (give three numbers in 0..1 units for R,G,B, e.g. "
                        f"{'0.485,0.456,0.406' if key == 'mean' else '0.229,0.224,0.225'})")
    return values


def milestones(text: str) -> list[int]:
    """Increasing positive epochs from '30,60,90' (or '[30, 60, 90]'); UserError otherwise."""
    parts = list_items(text)
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not values or values[0] < 1 or any(b <= a for a, b in zip(values, values[1:])):
        raise UserError(f"--lr_milestones got {text!r} (give increasing whole epochs above 0, e.g. 30,60,90)")
    return values


def _type_name(f: dataclasses.Field) -> str:
    return {"int": "an integer", "float": "a number", "bool": "True or False"}.get(
        _base_type(f), "a string")


def _base_type(f: dataclasses.Field) -> str:
    return str(f.type).split("|")[0].strip()


def _convert(f: dataclasses.Field, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise UserError."""
    kind = _base_type(f)
    if f.metadata["nullable"] and (value is None or (isinstance(value, str) and value in ("", "None", "null"))):
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value)
        if text in TRUE_WORDS:
            return True
        if text in FALSE_WORDS:
            return False
        raise UserError(f"--{f.name} got {value!r} (use one of True/False/true/false/1/0)")
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise UserError(f"--{f.name} got {value!r} (use a finite number: {f.metadata['help']})")
            return number
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"--{f.name} got {value!r} (use {_type_name(f)})") from None
    if value is None:
        raise UserError(f"--{f.name} needs a value ({f.metadata['help']})")
    return str(value)


def _check_value(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if value is None:
        return
    if meta["choices"] and value not in meta["choices"]:
        raise UserError(f"--{f.name} got {value!r} (choose from {', '.join(meta['choices'])})")
    if meta["min"] is not None and value < meta["min"]:
        raise UserError(f"--{f.name} got {value} (must be at least {meta['min']})")
    if meta["max"] is not None and value > meta["max"]:
        raise UserError(f"--{f.name} got {value} (must be at most {meta['max']})")


def _unknown(name: str, where: str) -> UserError:
    alias_of = {alias: key for key, aliases in ALIASES.items() for alias in aliases}
    close = difflib.get_close_matches(name, [*FIELDS, *alias_of], n=1, cutoff=0.7)
    hint = ""
    if close:
        key = alias_of.get(close[0], close[0])
        hint = f"did you mean --{key}? " if key == close[0] else f"did you mean --{close[0]} (= --{key})? "
    return UserError(f"unknown {where} '{name}' ({hint}valid keys: {', '.join(FIELDS)})")


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in lines:
                raise _DuplicateKey(f"key '{key}' appears twice (lines {lines[key]} and {key_node.start_mark.line + 1}")
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise UserError(f"config file {path} is a folder (pass a YAML file with --config_path, "
                        f"e.g. {DEFAULT_CONFIG.relative_to(ROOT)})")
    if not path.is_file():
        raise UserError(f"config file {path} not found (pass an existing file with --config_path, "
                        f"e.g. {DEFAULT_CONFIG.relative_to(ROOT)})")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as exc:
        raise UserError(f"config file {path}: {exc}; keep one)") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}; save it as "
                        "UTF-8)") from None
    except OSError as exc:
        raise UserError(f"config file {path} cannot be read ({exc.strerror}; check its permissions)") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]} "
                        "(fix the file)") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of key: value (fix the file)")
    for key in data:
        if key not in FIELDS:
            raise _unknown(str(key), f"key in {path}")
    return data


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit
        raise UserError(f"{message} (see --help)")


def _split_config_path(argv: Sequence[str]) -> tuple[Path, list[str]]:
    rest, path = [], DEFAULT_CONFIG
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg == "--config_path":
            if i + 1 >= len(argv):
                raise UserError("--config_path needs a value (a YAML file in configs/)")
            path = Path(argv[i + 1])
            next(it, None)
        elif arg.startswith("--config_path="):
            path = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        path = ROOT / path
    return path, rest


def load_config(argv: Sequence[str], tool: str = "train", description: str = "") -> Config:
    """Parse argv (without the program name) into a Config for `tool` (a key of TOOL_FLAGS)."""
    return parse_command_line(argv, tool, description)[0]


def parse_command_line(argv: Sequence[str], tool: str, description: str = "",
                       add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
                       ) -> tuple[Config, argparse.Namespace]:
    """(Config, the tool's own arguments added by `add_arguments`, e.g. predict's image paths).

    The YAML (--config_path) sets the defaults, TOOL_DEFAULTS[tool] override it, flags override both;
    TOOL_FLAGS[tool] routes one key's flags to another. Sets whether user errors show tracebacks (--debug).
    """
    same_as = TOOL_FLAGS[tool]
    taken = {other: [f"--{key}"] + [f"--{alias}" for alias in ALIASES.get(key, ())] for key, other in same_as.items()}
    config_path, rest = _split_config_path(argv)
    values = {**read_yaml(config_path), **TOOL_DEFAULTS.get(tool, {})}
    parser = _Parser(description=description, allow_abbrev=False,
                     epilog=f"Defaults come from --config_path (default {DEFAULT_CONFIG.relative_to(ROOT)}).")
    parser.add_argument("--config_path", default=str(config_path), help="YAML file with the defaults")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        if name in same_as:
            continue
        default = values.get(name, f.default)
        choices = f"; one of {', '.join(f.metadata['choices'])}" if f.metadata["choices"] else ""
        flags = [f"--{name}"] + [f"--{alias}" for alias in ALIASES.get(name, ())] + taken.get(name, [])
        # a boolean flag alone means True (`--pact_quant`), as in the seeds
        extra = {"nargs": "?", "const": "True"} if _base_type(f) == "bool" else {}
        section = f.metadata["section"]
        if section not in groups:
            groups[section] = parser.add_argument_group(section)
        text = f"{f.metadata['help']}{choices} (default: {default})".replace("%", "%%")  # argparse formats help
        groups[section].add_argument(*flags, dest=name, default=_NOT_GIVEN, type=str, metavar=_base_type(f).upper(),
                                     help=text, **extra)
    seed = parser.add_argument_group("the PyTorch MobileNetV3 seed's flags (beside the aliases above)")
    seed.add_argument("--apex", dest="_apex", nargs="?", const="True", default=_NOT_GIVEN, metavar="BOOL",
                      help=f"mixed precision as the seed's apex: sets amp_level to --apex-opt-level (default "
                      f"{APEX_DEFAULT_LEVEL}) and, on GPU/Ascend, apex's dynamic loss scale from 65536 unless "
                      "--loss_scale_type or --loss_scale is given")
    seed.add_argument("--apex-opt-level", dest="_apex_opt_level", default=_NOT_GIVEN, metavar="LEVEL",
                      choices=AMP_LEVELS, help="apex's level with --apex: O1, O2 (float16 with float32 BatchNorm) or "
                      "O3; the same levels as amp_level")
    own = set(vars(parser.parse_args([])))
    if add_arguments:
        add_arguments(parser)
    parsed, unknown = parser.parse_known_intermixed_args(list(rest))
    debug = _value(parsed, "debug", values, FIELDS["debug"])
    show_tracebacks(debug is True or str(debug) in TRUE_WORDS)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        if not flag.startswith("-"):
            raise UserError(f"unexpected argument '{flag}' (options are written --key value)")
        raise _unknown(flag.lstrip("-").split("=")[0], "flag")
    kwargs = {name: _convert(f, _value(parsed, name, values, f)) for name, f in FIELDS.items()}
    given = {name for name in FIELDS if getattr(parsed, name, None) is not _NOT_GIVEN} - set(same_as)
    given |= {other for key, other in same_as.items() if getattr(parsed, other, None) is not _NOT_GIVEN}
    given |= _seed_flags(parsed, kwargs, given)
    cfg = Config(**kwargs)
    object.__setattr__(cfg, "_given", frozenset(given))
    show_tracebacks(cfg.debug)
    return cfg, argparse.Namespace(**{k: v for k, v in vars(parsed).items() if k not in own})


def _seed_flags(parsed: argparse.Namespace, kwargs: dict[str, Any], given: set[str]) -> set[str]:
    """The PyTorch seed's rules, applied to `kwargs`: --apex sets amp_level (and, off CPU, apex's dynamic loss scale
    from 2**16 unless the loss scale keys are given); a step size on the command line means the step schedule (the
    seed's and torchvision's StepLR) unless --lr_decay_mode is given too. Returns the keys set."""
    apex, level = parsed._apex, parsed._apex_opt_level
    if apex is not _NOT_GIVEN and apex in AMP_LEVELS:  # --apex O2: the level given with the flag
        apex, level = "True", apex if level is _NOT_GIVEN else level
    if apex is not _NOT_GIVEN and apex not in TRUE_WORDS + FALSE_WORDS:
        raise UserError(f"--apex got {apex!r} (use --apex alone, --apex False, or --apex --apex-opt-level O1|O2|O3)")
    on = apex is not _NOT_GIVEN and apex in TRUE_WORDS
    if level is not _NOT_GIVEN and not on:
        raise UserError(f"--apex-opt-level {level} applies with --apex (the seed trains in float32 without it; add "
                        f"--apex, or pass --amp_level {level})")
    changed = set()
    if on:
        level = APEX_DEFAULT_LEVEL if level is _NOT_GIVEN else level
        if "amp_level" in given and kwargs["amp_level"] != level:
            raise UserError(f"--apex sets amp_level {level} but --amp_level {kwargs['amp_level']} is given too "
                            "(pass one of them)")
        kwargs["amp_level"] = level
        changed.add("amp_level")
        if level != "O0" and kwargs["platform"] != "CPU" and not {"loss_scale_type", "loss_scale"} & given:
            kwargs["loss_scale_type"], kwargs["loss_scale"] = "dynamic", APEX_LOSS_SCALE
            changed |= {"loss_scale_type", "loss_scale"}
    if "lr_step_size" in given and "lr_decay_mode" not in given:
        kwargs["lr_decay_mode"] = "step"
        changed.add("lr_decay_mode")
    return changed


def given_on_command_line(cfg: Config) -> frozenset[str]:
    """The keys the command line set (not the YAML or a default); empty for a Config built in code."""
    return getattr(cfg, "_given", frozenset())


def _value(parsed: argparse.Namespace, name: str, values: dict[str, Any], f: dataclasses.Field) -> Any:
    value = getattr(parsed, name, _NOT_GIVEN)
    return values.get(name, f.default) if value is _NOT_GIVEN else value


def config_text(cfg: Config) -> str:
    """The resolved config as config.yaml holds it."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    write_atomically(path, lambda tmp: tmp.write_text(config_text(cfg)))
