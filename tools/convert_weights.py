"""Convert published weights into a checkpoint of this package, once: the same mapping --pretrain_ckpt applies.

    python tools/convert_weights.py mindcv:mobilenet_v2_100 weights/mobilenetv2_imagenet.ckpt
    python tools/convert_weights.py resnet50-0676ba61.pth weights/resnet50_imagenet.ckpt --model resnet50
    python tools/convert_weights.py mobilenet_v3_large.safetensors weights/mbv3l.ckpt --model mobilenetv3_large

SRC is a .ckpt (MindSpore ModelZoo, mindcv), a torchvision/timm state dict (.safetensors; .pth/.pt with PyTorch
installed), a URL, or a short name (mindcv:NAME, torchvision:NAME; downloaded into the cache). DST is written
atomically, with this package's metadata: model, width, class count, the BatchNorm epsilon and padding of the
source's nets, the ImageNet preprocessing, and the source (layout, file name, sha256). Every parameter of the net
must come from SRC (else nothing is written).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.config import MODEL_NAMES, Config  # noqa: E402
from src.errors import UserError, run_cli  # noqa: E402
from src.logs import quiet_mindspore, setup_console_logging  # noqa: E402
from src.models.registry import canonical_name  # noqa: E402


def _model_name(text: str) -> str:
    name = canonical_name(text)
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown model {text!r} (choose from {', '.join(MODEL_NAMES)})")
    return name


def main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint file, URL or short name (mindcv:NAME, torchvision:NAME)")
    parser.add_argument("dst", help="the checkpoint to write (.ckpt)")
    parser.add_argument("--model", type=_model_name, help=f"the net, one of {', '.join(MODEL_NAMES)} or a peer's name "
                        "of one (default: the short name's)")
    parser.add_argument("--width", type=float, default=1.0, help="MobileNet width multiplier (default 1.0)")
    args = parser.parse_args(argv)
    setup_console_logging()
    quiet_mindspore()
    convert(args.src, Path(args.dst), args.model, args.width)
    return 0


def convert(src: str, dst: Path, model: str | None, width: float) -> Path:
    from src.engine.published import PUBLISHED

    model = model or (PUBLISHED[src].model if src in PUBLISHED else None)
    if model is None:
        raise UserError(f"--model is needed for {src} (one of {', '.join(MODEL_NAMES)})")
    if dst.suffix != ".ckpt":
        raise UserError(f"{dst} does not end in .ckpt (name the checkpoint to write, e.g. weights/{model}.ckpt)")
    if dst.resolve() == Path(src).resolve():
        raise UserError(f"{dst} is the source file (write the converted checkpoint to another path)")
    import logging

    from src.device import setup_device
    from src.engine.checkpoint import arch_meta, save_checkpoint
    from src.engine.layouts import check_family, read_weights
    from src.engine.published import file_sha256
    from src.engine.weights import arch_from_checkpoint, inference_net

    weights = read_weights(src, "SRC")
    check_family(weights, weights.meta.model or model, "SRC")
    meta = weights.meta
    cfg = Config(model=meta.model or model, width=meta.width or width, num_classes=meta.num_classes or 1000,
                 image_size=meta.image_size or 224)
    cfg = arch_from_checkpoint(cfg, meta, weights.path)
    setup_device(cfg)
    net = inference_net(cfg.replace(pact_quant=bool(meta.pact_quant)), weights)
    source = meta.source or json.dumps({"layout": weights.layout.name(cfg.model, cfg.width), "file": weights.path.name,
                                        "from": src, "sha256": file_sha256(weights.path)})
    info = {"model": cfg.model, "width": cfg.width, "num_classes": cfg.num_classes, "image_size": cfg.image_size,
            "pact_quant": bool(meta.pact_quant), "class_names": meta.class_names, **arch_meta(cfg),
            "preprocess": meta.preprocess, "source": source}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(net, dst, info)
    logging.getLogger("train").info("wrote %s: %s (%d classes), bn_eps %s, padding %s, from %s", dst, cfg.model,
                                    cfg.num_classes, cfg.bn_eps, cfg.padding, json.loads(source)["layout"])
    return dst


if __name__ == "__main__":
    sys.exit(run_cli(main))
