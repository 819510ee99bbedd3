"""Published weights in: each source's net, built in the source's framework with random weights and BatchNorm
statistics, saved in the source's format, gives the same logits here (mindcv and torchvision), and the ModelZoo's
names load; the loading rules (whole backbone, classifier fits or is filtered, optimizer state ignored)."""
from __future__ import annotations

import logging
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from src.config import Config
from src.engine.layouts import read_weights
from src.engine.weights import inference_net, load_pretrained, read_pretrained
from src.errors import UserError
from src.models import create_model

MODELS = ("mobilenetv2", "mobilenetv3_large", "mobilenetv3_small", "resnet50", "resnet101")
MINDCV = {"mobilenetv2": "mobilenet_v2_100", "mobilenetv3_large": "mobilenet_v3_large_100",
          "mobilenetv3_small": "mobilenet_v3_small_100", "resnet50": "resnet50", "resnet101": "resnet101"}
CLASSES = 7
TOLERANCE = 1e-4  # of the largest logit


@pytest.fixture(autouse=True)
def pynative():
    """Single forward passes: PyNative mode, put back afterwards for the other tests of this worker."""
    try:  # as setup_device does, before any kernel runs, so a later in-process setup_device may do it too
        ms.set_device("CPU")
    except RuntimeError:  # an earlier test of this worker ran kernels already
        pass
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=mode)


def _random(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Weights that keep activations in range through 100 layers, and BatchNorm statistics far from 0 and 1, so a
    wrong epsilon, a swapped layer or a lost statistic shows in the logits."""
    leaf = name.rpartition(".")[2]
    if leaf in ("moving_variance", "running_var"):
        return rng.uniform(0.002, 1.0, shape).astype(np.float32)
    if leaf in ("gamma", "moving_mean", "running_mean", "beta") or (leaf in ("weight", "bias") and len(shape) == 1):
        if leaf in ("gamma", "weight"):
            return rng.uniform(0.3, 1.0, shape).astype(np.float32)
        return rng.normal(0, 0.1, shape).astype(np.float32)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return rng.normal(0, np.sqrt(1.0 / fan_in), shape).astype(np.float32)


def _image(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0, 1, (2, 3, 64, 64)).astype(np.float32)


def _ours(path: Path, model: str) -> tuple[np.ndarray, object]:
    """Logits of this package's net built and loaded as eval.py/predict.py do, for the image of seed 1."""
    cfg = Config(model=model, num_classes=CLASSES, image_size=64)
    from src.engine.weights import arch_from_checkpoint

    weights = read_weights(path, "ckpt_file")
    cfg = arch_from_checkpoint(cfg, weights.meta, path)
    net = inference_net(cfg, weights)
    return net(ms.Tensor(_image(np.random.default_rng(1)))).asnumpy(), weights


def _fine_tune(path: Path, model: str, caplog) -> None:
    """--pretrain_ckpt PATH --filter_head True onto 3 classes: every backbone parameter loaded, only the classifier
    at init, said in the log."""
    cfg, weights = read_pretrained(Config(model=model, num_classes=3, filter_head=True, pretrain_ckpt=str(path)))
    net = create_model(model, 3, bn_eps=cfg.bn_eps, padding=cfg.padding)
    head = [p.name for p in net.get_parameters() if p.name.startswith(net.head_prefixes)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train"):
        report = load_pretrained(net, weights, cfg)
    total = len(list(net.get_parameters()))
    assert report.left_at_init == head and sorted(report.dropped) == sorted(head) and len(head) == 2
    assert report.loaded == total - 2
    assert f"{weights.layout.name(model)} layout: {total}/{total} parameters mapped" in caplog.text
    assert f"loaded {total - 2} parameters, dropped 2 classifier parameters" in caplog.text


def _close(want: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(want - got).max() / np.abs(want).max())


@pytest.mark.e2e  # builds full-size nets or trains in this process: seconds each
@pytest.mark.parametrize("model", MODELS)
def test_mindcv_checkpoints_give_mindcvs_logits(tmp_path, model, caplog):
    mindcv = pytest.importorskip("mindcv")
    rng = np.random.default_rng(0)
    source = mindcv.create_model(MINDCV[model], num_classes=CLASSES)
    for p in source.get_parameters():
        p.set_data(ms.Tensor(_random(p.name, tuple(p.shape), rng)))
    source.set_train(False)
    path = tmp_path / f"{MINDCV[model]}.ckpt"
    ms.save_checkpoint(source, str(path))
    want = source(ms.Tensor(_image(np.random.default_rng(1)))).asnumpy()
    got, weights = _ours(path, model)
    assert weights.layout.source == "mindcv" and weights.layout.name(model) == f"mindcv {MINDCV[model]}"
    assert _close(want, got) <= TOLERANCE, (want[0, :4], got[0, :4])
    _fine_tune(path, model, caplog)


def _torch_state(model: str, suffix: str, tmp_path: Path) -> tuple[Path, np.ndarray]:
    torch = pytest.importorskip("torch")
    from torch_nets import torchvision_net

    torch.manual_seed(0)
    net = torchvision_net(model, CLASSES)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.from_numpy(_random(name, tuple(tensor.shape), rng)))
        want = net(torch.from_numpy(_image(np.random.default_rng(1)))).numpy()
    path = tmp_path / f"{model}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(net.state_dict(), str(path))
    else:
        torch.save(net.state_dict(), str(path))
    return path, want


@pytest.mark.e2e  # builds full-size nets or trains in this process: seconds each
@pytest.mark.parametrize("model", MODELS)
def test_torchvision_state_dicts_give_torchvisions_logits(tmp_path, model, caplog):
    suffix = ".pth" if model in ("mobilenetv2", "resnet50") else ".safetensors"
    path, want = _torch_state(model, suffix, tmp_path)
    got, weights = _ours(path, model)
    assert weights.layout.source == "torchvision/timm"
    assert weights.meta.bn_eps == (1e-3 if model.startswith("mobilenetv3") else 1e-5)
    assert _close(want, got) <= TOLERANCE, (want[0, :4], got[0, :4])
    _fine_tune(path, model, caplog)


def test_a_safetensors_file_is_read_without_torch(tmp_path, monkeypatch):
    """.safetensors goes through the safetensors package alone; a .pth without PyTorch is one line saying how."""
    path, want = _torch_state("mobilenetv2", ".safetensors", tmp_path)
    pth, _ = _torch_state("mobilenetv2", ".pth", tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch now raises ImportError
    got, _ = _ours(path, "mobilenetv2")
    assert _close(want, got) <= TOLERANCE
    with pytest.raises(UserError, match=r"is a PyTorch file, and reading one needs PyTorch \(pip install torch"):
        read_weights(pth, "pretrain_ckpt")


def _modelzoo_checkpoint(tmp_path: Path, model: str, cfg: Config, drop: str = "") -> tuple[Path, dict]:
    """A ModelZoo training checkpoint: this package's backbone names, the ModelZoo's classifier name, and the
    optimizer state (moments.*, learning_rate, global_step, momentum) its training runs save."""
    net = create_model(model, 1000, bn_eps=cfg.bn_eps, padding=cfg.padding)
    rng = np.random.default_rng(2)
    values = {p.name: _random(p.name, tuple(p.shape), rng) for p in net.get_parameters()}
    names = {n: n.replace("head.1.", "dense.") for n in values}
    entries = [{"name": names[n], "data": ms.Tensor(v)} for n, v in values.items() if not (drop and drop in n)]
    entries += [{"name": f"moments.{names[n]}", "data": ms.Tensor(np.zeros_like(v))} for n, v in values.items()]
    entries += [{"name": "learning_rate", "data": ms.Tensor(np.float32(0.1))},
                {"name": "global_step", "data": ms.Tensor(np.int32(1000))},
                {"name": "momentum", "data": ms.Tensor(np.float32(0.9))}]
    path = tmp_path / f"{model}_modelzoo.ckpt"
    ms.save_checkpoint(entries, str(path))
    return path, values


@pytest.mark.parametrize("model", ["mobilenetv2", "resnet50"])
def test_modelzoo_checkpoints_load_by_their_published_names(tmp_path, model, caplog):
    conventions = {"mobilenetv2": {"bn_eps": 1e-5}, "resnet50": {"bn_eps": 1e-4, "padding": "modelzoo"}}[model]
    path, values = _modelzoo_checkpoint(tmp_path, model, Config(model=model, **conventions))
    cfg, weights = read_pretrained(Config(model=model, num_classes=3, filter_head=True, pretrain_ckpt=str(path)))
    assert weights.layout.source == "MindSpore ModelZoo" and weights.meta.num_classes == 1000
    assert (cfg.bn_eps, cfg.padding) == (conventions.get("bn_eps"), conventions.get("padding", "symmetric"))
    net = create_model(model, 3, bn_eps=cfg.bn_eps, padding=cfg.padding)
    head = net.head_prefixes
    with caplog.at_level(logging.INFO, logger="train"):
        report = load_pretrained(net, weights, cfg)
    assert sorted(report.left_at_init) == sorted(report.dropped) and all(n.startswith(head) for n in report.dropped)
    for p in net.get_parameters():
        if not p.name.startswith(head):
            np.testing.assert_array_equal(p.asnumpy(), values[p.name], err_msg=p.name)
    assert f"pretrain_ckpt {path}: ignored {len(values) + 3} optimizer entries (moments." in caplog.text
    assert f"loaded {len(values) - 2} parameters, dropped 2 classifier parameters" in caplog.text
    assert "0 left at init" not in caplog.text and "2 left at init" in caplog.text


def test_a_partial_backbone_is_refused_naming_what_is_missing(tmp_path):
    """The ModelZoo ResNet-50 without its four downsample shortcuts (20 parameters): never a silent random init."""
    cfg = Config(model="resnet50", bn_eps=1e-4, padding="modelzoo")
    path, _ = _modelzoo_checkpoint(tmp_path, "resnet50", cfg, drop="down_sample_layer")
    cfg, weights = read_pretrained(Config(model="resnet50", num_classes=3, filter_head=True, pretrain_ckpt=str(path)))
    with pytest.raises(UserError, match=r"\(MindSpore ModelZoo layout\) lacks 20 backbone parameters of resnet50: "
                                        r"layer1\.0\.down_sample_layer\.0\.weight, .*they would train from random"):
        load_pretrained(create_model("resnet50", 3, bn_eps=cfg.bn_eps, padding=cfg.padding), weights, cfg)


def test_a_head_of_other_classes_or_another_net_is_refused_before_anything_builds(tmp_path):
    path, _ = _torch_state("mobilenetv2", ".safetensors", tmp_path)
    with pytest.raises(UserError, match=r"has a 7-class classifier but num_classes is 3 \(pass --filter_head True"):
        read_pretrained(Config(num_classes=3, pretrain_ckpt=str(path)))
    with pytest.raises(UserError, match=r"holds torchvision/timm mobilenetv2 weights but --model is resnet50 \(pass "
                                        r"--model mobilenetv2\)"):
        read_pretrained(Config(model="resnet50", num_classes=7, pretrain_ckpt=str(path)))


def test_weights_of_another_size_name_the_layer_that_does_not_fit(tmp_path):
    mindcv = pytest.importorskip("mindcv")
    path = tmp_path / "small.ckpt"
    ms.save_checkpoint(mindcv.create_model("mobilenet_v3_small_100", num_classes=CLASSES), str(path))
    cfg, weights = read_pretrained(Config(model="mobilenetv3_large", num_classes=CLASSES, pretrain_ckpt=str(path)))
    with pytest.raises(UserError, match=r"\(mindcv mobilenetv3 layout\) has 88 layers where mobilenetv3_large "
                                        r"\(width 1\) has 110 \(it fits mobilenetv3_small: pass --model "
                                        r"mobilenetv3_small\)"):
        load_pretrained(create_model("mobilenetv3_large", CLASSES), weights, cfg)


def test_names_of_no_known_layout_are_refused(tmp_path):
    path = tmp_path / "other.ckpt"
    ms.save_checkpoint([{"name": "encoder.w", "data": ms.Tensor(np.zeros(3, np.float32))}], str(path))
    with pytest.raises(UserError, match=r"its parameter names \(encoder.w\) match none of the layouts"):
        read_weights(path, "pretrain_ckpt")


def test_the_converter_writes_a_checkpoint_of_this_package_with_the_same_logits(tmp_path):
    import json

    from conftest import run_cli

    from src.engine.checkpoint import read_checkpoint
    from src.engine.published import file_sha256

    src, _ = _torch_state("mobilenetv3_small", ".safetensors", tmp_path)
    dst = tmp_path / "out" / "mbv3s.ckpt"
    result = run_cli("tools/convert_weights.py", str(src), str(dst), "--model", "mobilenetv3_small")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"wrote {dst}: mobilenetv3_small (7 classes), bn_eps 0.001, padding symmetric, from torchvision/timm "
            "mobilenet_v3_small") in result.stderr + result.stdout
    meta = read_checkpoint(dst)[1]
    assert (meta.model, meta.num_classes, meta.width, meta.bn_eps, meta.padding) == (
        "mobilenetv3_small", CLASSES, 1.0, 1e-3, "symmetric")
    assert json.loads(meta.source) == {"layout": "torchvision/timm mobilenet_v3_small", "file": src.name,
                                       "from": str(src), "sha256": file_sha256(src)}
    assert json.loads(meta.preprocess) == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                           "crop_pct": 0.875, "interpolation": "bilinear"}
    np.testing.assert_array_equal(_ours(dst, "mobilenetv3_small")[0], _ours(src, "mobilenetv3_small")[0])
    refused = run_cli("tools/convert_weights.py", str(src), str(tmp_path / "x.ckpt"))
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"error: --model is needed for {src} (one of mobilenetv2, mobilenetv3_large, mobilenetv3_small, resnet50, "
        "resnet101)")


def test_inference_takes_class_count_conventions_and_preprocessing_from_published_weights(tmp_path):
    from src.engine.weights import open_for_inference

    path, _ = _torch_state("mobilenetv3_large", ".safetensors", tmp_path)
    cfg, weights = open_for_inference(Config(model="mobilenetv3_large", mean="0.5,0.5,0.5"), str(path), "ckpt_file")
    assert (cfg.num_classes, cfg.bn_eps, cfg.padding, cfg.image_size) == (CLASSES, 1e-3, "symmetric", 224)
    assert (cfg.mean, cfg.std, cfg.crop_pct, cfg.interpolation) == ("0.5,0.5,0.5", "0.229,0.224,0.225", 0.875,
                                                                    "bilinear")  # a key the user set stays


def test_a_command_line_convention_wins_over_the_layouts_with_a_warning(tmp_path, caplog):
    """--padding/--bn_eps given on the command line are kept (a user who knows better), said in a warning."""
    from src.config import load_config
    from src.engine.weights import open_for_inference

    mindcv = pytest.importorskip("mindcv")
    path = tmp_path / "m.ckpt"
    ms.save_checkpoint(mindcv.create_model("mobilenet_v3_small_100", num_classes=CLASSES), str(path))
    cfg = load_config(["--model", "mobilenetv3_small", "--padding", "symmetric"], "predict")
    with caplog.at_level(logging.WARNING, logger="train"):
        cfg, _ = open_for_inference(cfg, str(path), "ckpt_file")
    assert (cfg.num_classes, cfg.bn_eps, cfg.padding) == (CLASSES, 1e-5, "symmetric")
    assert f"{path} was trained with padding=mindcv; --padding symmetric changes its outputs" in caplog.text


def test_a_backbone_without_its_classifier_loads_and_the_classifier_starts_at_init(tmp_path, caplog):
    torch = pytest.importorskip("torch")
    from torch_nets import torchvision_net

    state = {k: v for k, v in torchvision_net("resnet50", 10).state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "backbone.pth"
    torch.save(state, str(path))
    cfg, weights = read_pretrained(Config(model="resnet50", num_classes=3, pretrain_ckpt=str(path)))
    assert weights.meta.num_classes is None  # no classifier, so no class count to refuse
    report = load_pretrained(create_model("resnet50", 3), weights, cfg)
    assert report.left_at_init == ["end_point.weight", "end_point.bias"] and report.dropped == []


def test_a_modelzoo_resnet_backbone_is_told_from_mindcvs_by_its_shortcut_names(tmp_path):
    """ModelZoo `down_sample_layer`, mindcv `down_sample`: with or without the classifier."""
    path, _ = _modelzoo_checkpoint(tmp_path, "resnet50", Config(model="resnet50"), drop="end_point")
    weights = read_weights(path, "pretrain_ckpt")
    assert (weights.layout.source, weights.meta.bn_eps, weights.meta.padding) == ("MindSpore ModelZoo", 1e-4,
                                                                                  "modelzoo")


def test_train_refuses_a_partial_backbone_with_one_line_and_exit_2(tmp_path):
    from conftest import make_imagefolder, run_cli

    path, _ = _modelzoo_checkpoint(tmp_path, "resnet50", Config(model="resnet50", bn_eps=1e-4, padding="modelzoo"),
                                   drop="down_sample_layer")
    data, out = make_imagefolder(tmp_path / "data"), tmp_path / "out"
    result = run_cli("train.py", "--model", "resnet50", "--dataset_path", str(data), "--output_path", str(out),
                     "--num_classes", "2", "--image_size", "32", "--batch_size", "4", "--epoch_size", "1",
                     "--pretrain_ckpt", str(path), "--filter_head", "True")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: pretrain_ckpt {path} (MindSpore ModelZoo layout) lacks 20 backbone parameters "
                           "of resnet50: layer1.0.down_sample_layer.0.weight"), last
    assert not list(out.rglob("*.ckpt"))


@pytest.mark.parametrize("source", ["torchvision", "modelzoo"])
def test_fine_tuning_from_torchvision_and_modelzoo_weights_trains(tmp_path, source):
    """train.py --pretrain_ckpt (a torchvision .safetensors, a ModelZoo training checkpoint) --filter_head True:
    the layout line, every backbone parameter loaded, only the classifier at init, and a finished run."""
    from conftest import TINY_TRAIN, make_imagefolder, run_cli

    if source == "torchvision":
        pytest.importorskip("torch")
        from safetensors.torch import save_file
        from torch_nets import MobileNetV2

        path = tmp_path / "mobilenet_v2.safetensors"
        save_file(MobileNetV2(1000, width=0.25).state_dict(), str(path))
        layout = "torchvision/timm mobilenet_v2 layout: 262/262 parameters mapped"
    else:
        net = create_model("mobilenetv2", 1000, 0.25)
        path = tmp_path / "mobilenetv2_modelzoo.ckpt"
        entries = [{"name": p.name.replace("head.1.", "dense."), "data": p} for p in net.get_parameters()]
        ms.save_checkpoint(entries + [{"name": "global_step", "data": ms.Tensor(np.int32(5))}], str(path))
        layout = "MindSpore ModelZoo layout: 262/262 parameters mapped"
    data, out = make_imagefolder(tmp_path / "data"), tmp_path / "out"
    result = run_cli("train.py", "--dataset_path", str(data), "--output_path", str(out), "--epoch_size", "1",
                     "--pretrain_ckpt", str(path), "--filter_head", "True", *TINY_TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert layout in log
    assert ("loaded 260 parameters, dropped 2 classifier parameters (head.1.bias, head.1.weight), 2 left at init "
            "(head.1.weight, head.1.bias)") in log
    assert (out / "checkpoint" / "best.ckpt").is_file()
