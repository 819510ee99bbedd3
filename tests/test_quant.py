"""PACT quantization-aware training: fake-quant numerics, gradients, checkpoints, CLI and the QDQ ONNX export."""
from __future__ import annotations

import json
import re
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from conftest import DIFF_LINE, RESULT_LINE, TINY_NET, run_cli
from mindspore import Tensor, nn

from src.config import Config
from src.engine.checkpoint import read_checkpoint, save_checkpoint
from src.engine.layouts import read_weights
from src.engine.weights import load_pretrained
from src.errors import UserError
from src.models import create_model, net_from_config
from src.models.quant import ActQuant, fake_quant, quant_layers, quantize_net, weight_scale


class _Weighted(nn.Cell):
    """sum(w * act_quant(x)): the upstream gradient of element i is w[i]."""

    def __init__(self, quant: ActQuant, w: np.ndarray):
        super().__init__()
        self.quant = quant
        self.w = Tensor(w)

    def construct(self, x):
        return (self.quant(x) * self.w).sum()


class _Grad(nn.Cell):
    """(d/dx, d/d(trainable params)) of `net`."""

    def __init__(self, net: nn.Cell):
        super().__init__()
        self.net = net
        self.weights = ms.ParameterTuple(net.trainable_params())
        self.grad = ms.ops.GradOperation(get_all=True, get_by_list=True)

    def construct(self, x):
        (grad_x,), grads = self.grad(self.net, self.weights)(x)
        return grad_x, grads


def test_weights_are_fake_quantized_per_output_channel_onto_the_int8_grid():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32) * np.array([1, 10, 0.1, 3], np.float32)[:, None, None, None]
    scale = weight_scale(Tensor(w)).asnumpy()
    assert scale.shape == (4, 1, 1, 1)
    np.testing.assert_allclose(scale.ravel(), np.abs(w).reshape(4, -1).max(1) / 127, rtol=1e-6)
    q = fake_quant(Tensor(w), Tensor(scale)).asnumpy()
    steps = q / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # on the grid
    assert np.abs(steps).max() <= 127 + 1e-3
    np.testing.assert_allclose(np.abs(steps).reshape(4, -1).max(1), 127, atol=1e-3)  # each channel uses its range
    assert np.abs(q - w).max() <= scale.max() / 2 + 1e-6  # rounding error at most half a step


def test_activation_quantization_uses_the_moving_average_abs_max_scale():
    quant = ActQuant(alpha=100.0)
    quant.set_train(True)
    first, second = np.array([0.5, -2.0, 1.0], np.float32), np.array([4.0, 0.3, -1.0], np.float32)
    quant(Tensor(first))
    out = quant(Tensor(second)).asnumpy()
    # bias-corrected EMA with rate 0.9: state = 0.9 * 1 + 1, accum = 0.9 * 2 + 4
    np.testing.assert_allclose(quant.act_state.asnumpy(), [1.9], rtol=1e-6)
    np.testing.assert_allclose(quant.act_accum.asnumpy(), [5.8], rtol=1e-6)
    scale = 5.8 / 1.9 / 127
    # 4.0 lies beyond the averaged range (5.8 / 1.9 = 3.05): it saturates at 127 steps
    np.testing.assert_allclose(out / scale, np.clip(np.round(second / scale), -127, 127), atol=1e-3)
    assert round(float(out[0] / scale)) == 127
    quant.set_train(False)  # eval: the stored scale, no update
    x = np.linspace(-3, 3, 7).astype(np.float32)
    np.testing.assert_allclose(quant(Tensor(x)).asnumpy(), np.clip(np.round(x / scale), -127, 127) * scale,
                               atol=1e-6)
    np.testing.assert_allclose(quant.act_state.asnumpy(), [1.9], rtol=1e-6)


def test_pact_alpha_gradient_and_straight_through_input_gradient():
    quant = ActQuant(alpha=1.0)
    quant.set_train(True)
    x = np.array([-3.0, -1.5, -0.5, 0.2, 0.9, 1.2, 2.5], np.float32)
    w = np.arange(1, 8).astype(np.float32)
    net = _Weighted(quant, w)
    net.set_train(True)
    # a Cell holding the gradient: its compiled graph is keyed by the cell (ms.grad on a bare function was seen
    # to reuse another test's graph under MindSpore 2.10's compile cache)
    grad_x, (grad_alpha,) = _Grad(net)(Tensor(x))
    # hand-computed: d/d(alpha) = sum of w where x > alpha minus sum of w where x < -alpha = (6 + 7) - (1 + 2)
    np.testing.assert_allclose(grad_alpha.asnumpy(), [10.0])
    # rounding is straight-through: inside the clip range the gradient is w itself, outside it is 0
    np.testing.assert_allclose(grad_x.asnumpy(), np.where(np.abs(x) < 1.0, w, 0.0))


@pytest.mark.e2e  # builds full-size nets or trains in this process: seconds each
def test_quantized_net_keeps_the_float_names_and_a_float_checkpoint_loads(tmp_path: Path):
    np.random.seed(0)  # the init draws from numpy's generator (as --seed fixes it): not whatever earlier tests left
    float_net = create_model("mobilenetv2", 3, 0.25)
    path = tmp_path / "float.ckpt"
    save_checkpoint(float_net, path, {"model": "mobilenetv2", "num_classes": 3, "width": 0.25})
    cfg = Config(num_classes=3, width=0.25, pact_quant=True)
    qat = net_from_config(cfg)
    float_names = {p.name for p in float_net.get_parameters()}
    qat_names = {p.name for p in qat.get_parameters()}
    assert float_names < qat_names
    layers = quant_layers(qat)
    assert len(layers) == sum(isinstance(c, (nn.Conv2d, nn.Dense)) for _, c in float_net.cells_and_names())
    assert {n[: -len("weight")] + "pact_alpha" for n, _ in layers} == {n for n in qat_names if n.endswith("alpha")}
    report = load_pretrained(qat, read_weights(path, "pretrain_ckpt"), cfg)
    assert report.loaded == len(float_names)
    assert len(report.left_at_init) == 3 * len(layers) and all("act_" in n or "pact" in n
                                                                for n in report.left_at_init)
    # the QAT net computes the float net up to quantization error
    x = Tensor(np.random.default_rng(1).normal(0, 1, (2, 3, 32, 32)).astype(np.float32))
    float_net.set_train(False)
    qat.set_train(False)
    want, got = float_net(x).asnumpy(), qat(x).asnumpy()
    assert not np.array_equal(want, got)
    assert np.abs(want - got).max() <= 0.2 * np.abs(want).max() + 1e-6


@pytest.mark.e2e  # builds full-size nets or trains in this process: seconds each
def test_quantization_state_is_saved_in_the_checkpoint(tmp_path: Path):
    net = quantize_net(create_model("mobilenetv2", 2, 0.25))
    net.set_train(True)
    net(Tensor(np.ones((2, 3, 32, 32), np.float32)))
    save_checkpoint(net, tmp_path / "q.ckpt", {"model": "mobilenetv2", "pact_quant": True})
    params, meta = read_checkpoint(tmp_path / "q.ckpt")
    assert meta.pact_quant is True
    assert params["features.0.features.0.act_state"].asnumpy()[0] == pytest.approx(1.0)
    assert params["features.0.features.0.act_accum"].asnumpy()[0] > 0
    assert params["features.0.features.0.pact_alpha"].asnumpy()[0] == pytest.approx(20.0)


def test_pact_quant_with_a_frozen_backbone_is_refused():
    with pytest.raises(UserError, match="cannot be combined with --freeze_layer"):
        Config(pact_quant=True, freeze_layer="backbone", pretrain_ckpt="x.ckpt")


@pytest.fixture(scope="module")
def qat_run(trained, tmp_path_factory):
    """QAT fine-tuning from the shared float run, with the seed's flag spellings."""
    data, float_out = trained.data, trained.out
    qat_out = tmp_path_factory.mktemp("qat") / "qat"
    common = ["--dataset_path", str(data), "--batch_size", "4", "--warmup_epochs", "0", *TINY_NET]
    proc = run_cli("train.py", "--output_path", str(qat_out), f"--pretrained={float_out}/checkpoint/best.ckpt",
                   "--pact_quant", "--lr=0.001", "--epochs=1", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, float_out, qat_out, proc


def test_qat_run_logs_and_saves_a_quantized_checkpoint(qat_run):
    data, float_out, qat_out, proc = qat_run
    log = (qat_out / "train.log").read_text()
    assert "PACT quantization-aware training" in log and "left at init" in log
    assert re.search(r"^\[Epoch 1, iter: 0\] top1: \d\.\d{5}, top5: \d\.\d{5}, lr: 0\.00100, loss: ", log, re.M)
    params, meta = read_checkpoint(qat_out / "checkpoint" / "best.ckpt")
    assert meta.pact_quant is True and any(n.endswith("act_accum") for n in params)
    refused = run_cli("eval.py", "--dataset_path", str(data), "--output_path", str(qat_out), *TINY_NET)
    assert refused.returncode == 2 and "pass --pact_quant True" in refused.stderr
    refused = run_cli("eval.py", "--dataset_path", str(data), "--output_path", str(float_out), "--pact_quant",
                      "True", *TINY_NET)
    assert refused.returncode == 2 and "float checkpoint" in refused.stderr and "--pact_quant True" in refused.stderr


def test_qdq_onnx_export_matches_the_qat_net(qat_run, tmp_path: Path):
    import onnx

    data, float_out, qat_out, _ = qat_run
    exported = run_cli("export.py", "--output_path", str(qat_out), "--file_format", "ONNX", "--pact_quant", "True",
                       "--file_name", str(tmp_path / "qat"), *TINY_NET)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert float(DIFF_LINE.search(exported.stdout).group(1)) <= 1e-4
    model = onnx.load(str(tmp_path / "qat.onnx"))
    ops = [n.op_type for n in model.graph.node]
    convs = ops.count("Conv") + ops.count("Gemm")
    assert ops.count("QuantizeLinear") == convs and ops.count("DequantizeLinear") == 2 * convs
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("_int8")]
    assert len(int8) == convs
    # the same weights as float32 would take 4 bytes each: the int8 file is less than half of that
    float_bytes = sum(4 * int(np.prod(i.dims)) for i in model.graph.initializer)
    assert (tmp_path / "qat.onnx").stat().st_size < 0.5 * float_bytes
    # eval.py takes export.py's --ckpt_file spelling, eval_onnx.py predict.py's --onnx_file
    ms_eval = run_cli("eval.py", "--dataset_path", str(data), "--output_path", str(tmp_path / "eval"), "--pact_quant",
                      "True", "--ckpt_file", str(qat_out / "checkpoint" / "best.ckpt"), *TINY_NET)
    ort_eval = run_cli("eval_onnx.py", "--dataset_path", str(data), "--output_path", str(qat_out), "--onnx_file",
                       str(tmp_path / "qat.onnx"), *TINY_NET)
    assert ms_eval.returncode == 0 and ort_eval.returncode == 0, ms_eval.stderr[-2000:] + ort_eval.stderr[-2000:]
    assert RESULT_LINE.search(ms_eval.stdout).group(1) == RESULT_LINE.search(ort_eval.stdout).group(1)
    # tools/bench_onnx.py times ONNX files in fresh processes and shows what onnxruntime made of the graph
    bench = run_cli("tools/bench_onnx.py", str(tmp_path / "qat.onnx"), str(tmp_path / "qat.onnx"), "--batch_sizes",
                    "1,2", "--rounds", "1", "--steps", "2", "--warmup", "1")
    assert bench.returncode == 0, bench.stderr[-2000:]
    rows = json.loads(bench.stdout.strip().splitlines()[-1])["rows"]
    assert [(r["batch"], r["ratio_to_first"] > 0, r["img_per_s"] > 0) for r in rows] == [(1, True, True)] * 2 + [
        (2, True, True)] * 2
    assert all(r["ops"].get("DequantizeLinear") for r in rows) and "after onnxruntime's optimisation: " in bench.stdout
    mindir = run_cli("export.py", "--output_path", str(qat_out), "--pact_quant", "True", "--file_name",
                     str(tmp_path / "qat"), *TINY_NET)
    assert mindir.returncode == 0 and float(DIFF_LINE.search(mindir.stdout).group(1)) <= 1e-5
