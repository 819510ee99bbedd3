"""export.py (MINDIR, ONNX, AIR refusal), eval_onnx.py, predict.py and mindspore_hub_conf.py."""
from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import DIFF_LINE, RESULT_LINE, ROOT, TINY_NET, run_cli, with_flags

from mindspore_hub_conf import create_network
from src.models import count_trainable_params


@pytest.mark.parametrize("fmt,ext", [("MINDIR", ".mindir"), ("ONNX", ".onnx")])
def test_export_reproduces_the_net(trained, fmt, ext):
    data, out, _ = trained
    proc = run_cli("export.py", "--output_path", str(out), "--file_format", fmt, *TINY_NET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = out / f"mobilenetv2{ext}"
    assert path.is_file() and path.stat().st_size > 100_000
    assert float(DIFF_LINE.search(proc.stdout).group(1)) <= 1e-4
    assert not list(out.glob(".tmp-*"))


def test_onnx_evaluation_and_prediction_match_mindspore(trained, tmp_path):
    data, out, _ = trained
    onnx_file = tmp_path / "model.onnx"
    assert run_cli("export.py", "--output_path", str(out), "--file_format", "ONNX", "--file_name",
                   str(tmp_path / "model"), *TINY_NET).returncode == 0
    ms_eval = run_cli("eval.py", "--dataset_path", str(data), "--output_path", str(tmp_path), "--pretrain_ckpt",
                      str(out / "checkpoint" / "best.ckpt"), *TINY_NET)
    ort_eval = run_cli("eval_onnx.py", "--dataset_path", str(data), "--output_path", str(tmp_path), "--file_name",
                       str(onnx_file), *TINY_NET)
    assert ort_eval.returncode == 0, ort_eval.stderr[-3000:]
    assert "does not match actual shape" not in ort_eval.stderr  # dynamic batch on the output too
    # the preprocessing travels: the checkpoint records what training used, the ONNX file what the checkpoint says
    import json

    import onnx

    from src.engine.checkpoint import read_checkpoint

    recorded = read_checkpoint(out / "checkpoint" / "best.ckpt")[1].preprocess
    assert json.loads(recorded) == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875,
                                    "interpolation": "bilinear"}
    onnx_meta = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(onnx_meta["preprocess"]) == json.loads(recorded)
    ms_acc, ms_top5, _ = RESULT_LINE.search(ms_eval.stdout).groups()
    ort_acc, ort_top5, ckpt = RESULT_LINE.search(ort_eval.stdout).groups()
    assert abs(float(ms_acc) - float(ort_acc)) <= 0.005 and ckpt == str(onnx_file)
    images = [str(next((data / "val" / c).iterdir())) for c in ("cat", "dog")]
    by_ckpt = run_cli("predict.py", "--ckpt_file", str(out / "checkpoint" / "best.ckpt"), *images, *TINY_NET)
    by_onnx = run_cli("predict.py", "--onnx_file", str(onnx_file), *images, *TINY_NET)
    assert by_ckpt.returncode == 0 and by_onnx.returncode == 0, by_ckpt.stderr[-2000:] + by_onnx.stderr[-2000:]
    rows = re.findall(r"^  ([12])\. (cat|dog)\s+(\d\.\d{4})$", by_ckpt.stdout, re.M)
    assert len(rows) == 4 and by_ckpt.stdout.splitlines()[0] == images[0]
    onnx_rows = re.findall(r"^  ([12])\. (cat|dog)\s+(\d\.\d{4})$", by_onnx.stdout, re.M)
    assert [r[:2] for r in onnx_rows] == [r[:2] for r in rows]  # same classes in the same order
    # the images are flat colours, so some BatchNorm running variances are near 0 and amplify float32 rounding
    # differences between MindSpore's and onnxruntime's kernels (export.py's check on random input is <= 1e-4)
    np.testing.assert_allclose([float(p) for *_, p in rows], [float(p) for *_, p in onnx_rows], atol=2e-2)


def test_air_off_ascend_is_a_clear_error(trained):
    data, out, _ = trained
    proc = run_cli("export.py", "--output_path", str(out), "--file_format", "AIR", *TINY_NET)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: AIR export needs an Ascend device")
    assert not (out / "mobilenetv2.air").exists()


def test_predict_errors(trained, tmp_path):
    data, out, _ = trained
    proc = run_cli("predict.py", "--ckpt_file", str(out / "checkpoint" / "best.ckpt"), *TINY_NET)
    assert proc.returncode == 2 and "no images given" in proc.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xffnot really")
    proc = run_cli("predict.py", "--ckpt_file", str(out / "checkpoint" / "best.ckpt"), str(bad), *TINY_NET)
    assert proc.returncode == 2 and f"error: {bad} is truncated" in proc.stderr
    proc = run_cli("predict.py", "--ckpt_file", str(out / "checkpoint" / "best.ckpt"), str(tmp_path), *TINY_NET)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path} is a folder (pass image files, e.g. " \
        f"{tmp_path}/*.jpg)"
    # a JPEG cut in half with an end marker appended: named, and nothing written where predict.py runs (MindSpore's
    # decoder writes ./abnormal_image.jpg for an image it cannot decode)
    from test_dataset import _damaged

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(_damaged("cut_jpeg_with_end_marker")[1])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run_cli(str(ROOT / "predict.py"), "--ckpt_file", str(out / "checkpoint" / "best.ckpt"), str(cut),
                   *TINY_NET, cwd=cwd)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {cut} is damaged (Corrupt JPEG data: premature end of data segment: part of the image would be made "
        "up) (pass a valid image)")
    assert list(cwd.iterdir()) == []
    proc = run_cli("eval_onnx.py", "--dataset_path", str(data), "--file_name", str(tmp_path / "none.onnx"), *TINY_NET)
    assert proc.returncode == 2 and "not found (export one with python export.py --file_format ONNX)" in proc.stderr


@pytest.mark.parametrize("name,count", [("mobilenetv2", 3_504_872), ("mobilenetv3_large", 5_483_032),
                                        ("mobilenetv3_small", 2_542_856), ("resnet50", 25_557_032),
                                        ("resnet101", 44_549_160)])
def test_hub_create_network(name, count):
    assert count_trainable_params(create_network(name, num_classes=1000)) == count


def test_hub_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown network 'vgg' \(known: mobilenetv2, mobilenetv3_large, "
                       r"mobilenetv3_small, resnet50, resnet101\)"):
        create_network("vgg")


def test_onnx_mismatch_names_the_flag(trained, tmp_path):
    data, out, _ = trained
    assert run_cli("export.py", "--output_path", str(out), "--file_format", "ONNX", *TINY_NET).returncode == 0
    proc = run_cli("eval_onnx.py", "--dataset_path", str(data), "--output_path", str(out),
                   *with_flags(TINY_NET, image_size=48))
    assert proc.returncode == 2 and "exported for image_size 32" in proc.stderr and "--image_size 32" in proc.stderr


def test_export_to_a_new_folder(trained, tmp_path):
    data, out, _ = trained
    target = tmp_path / "deploy" / "mbv2"
    proc = run_cli("export.py", "--output_path", str(out), "--file_format", "MINDIR", "--file_name", str(target),
                   *TINY_NET)
    assert proc.returncode == 0 and (tmp_path / "deploy" / "mbv2.mindir").is_file(), proc.stderr[-2000:]


def test_eval_takes_the_model_settings_from_the_checkpoint(trained, tmp_path):
    data, out, _ = trained
    ckpt = str(out / "checkpoint" / "best.ckpt")
    # demo.yaml says width 1.0, 10 classes: the checkpoint's 0.25 and 2 are used, and said
    proc = run_cli("eval.py", "--dataset_path", str(data), "--output_path", str(tmp_path), "--pretrain_ckpt", ckpt,
                   "--num_parallel_workers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{ckpt}: width=0.25, num_classes=2 from the checkpoint" in proc.stdout
    assert RESULT_LINE.search(proc.stdout)
    # an explicit other image size is used, with a warning
    proc = run_cli("eval.py", "--dataset_path", str(data), "--output_path", str(tmp_path), "--pretrain_ckpt", ckpt,
                   "--num_parallel_workers", "1", "--image_size", "64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (f"\nwarning: image_size 64: {ckpt} was trained at 32 px; its accuracy at another size may differ\n"
            in "\n" + proc.stdout)


def test_an_export_that_does_not_reproduce_the_net_fails_and_keeps_the_earlier_file(trained, tmp_path, monkeypatch):
    from mindspore import nn

    import src.deploy.export as export
    from src.config import load_config
    from src.errors import UserError

    earlier = tmp_path / "m.mindir"
    earlier.write_bytes(b"an earlier export")
    real_graph_cell = nn.GraphCell

    class OffByOne:  # a MINDIR whose outputs are all 1 off: what a broken export looks like
        def __init__(self, graph):
            self.cell = real_graph_cell(graph)

        def __call__(self, x):
            return self.cell(x) + 1

    monkeypatch.setattr(export.nn, "GraphCell", OffByOne)
    cfg = load_config(["--output_path", str(trained.out), "--file_format", "MINDIR", "--file_name",
                       str(tmp_path / "m"), *TINY_NET])
    with pytest.raises(export.ExportMismatch, match=rf"the exported MINDIR model differs from the MindSpore net by 1 "
                                                    rf"\(more than 0.0001\), so {re.escape(str(earlier))} was not "
                                                    r"written \(an export bug"):
        export.export_model(cfg)
    assert earlier.read_bytes() == b"an earlier export" and sorted(p.name for p in tmp_path.iterdir()) == ["m.mindir"]
    assert issubclass(export.ExportMismatch, UserError)  # one line, exit 2


def test_file_name_under_a_file_is_one_line(trained, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    proc = run_cli("export.py", "--output_path", str(trained.out), "--file_format", "MINDIR", "--file_name",
                   str(blocker / "m"), *TINY_NET)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: the folder of file_name {blocker} cannot be created: {blocker} is a file "
                                   "(pass another --file_name)")


def test_eval_onnx_finds_the_export_named_after_the_checkpoints_model(tmp_path):
    """export.py names the file after the checkpoint's model (mobilenetv3_large.onnx) while the config may say
    mobilenetv2: with only --output_path, eval_onnx.py takes the one ONNX file there, and names the choice to make
    when there are several."""
    from src.config import load_config
    from src.deploy.onnx_eval import onnx_path
    from src.errors import UserError

    cfg = load_config(["--output_path", str(tmp_path)], "eval_onnx")
    assert cfg.model == "mobilenetv2" and onnx_path(cfg) == tmp_path / "mobilenetv2.onnx"  # nothing there yet
    (tmp_path / ".tmp-7-mobilenetv2.onnx").write_bytes(b"")  # an export being written is not a candidate
    (tmp_path / "mobilenetv3_large.onnx").write_bytes(b"")
    assert onnx_path(cfg) == tmp_path / "mobilenetv3_large.onnx"
    (tmp_path / "resnet50.onnx").write_bytes(b"")
    with pytest.raises(UserError, match=r"holds 2 ONNX files: mobilenetv3_large.onnx, resnet50.onnx \(pass "
                                        r"--onnx_file with the one to evaluate\)"):
        onnx_path(cfg)
    (tmp_path / "mobilenetv2.onnx").write_bytes(b"")  # the config's model wins when its file is there
    assert onnx_path(cfg) == tmp_path / "mobilenetv2.onnx"


def _foreign_onnx(path, classes=1000, size=None, features=None, metadata=None):
    """A small ONNX classifier as other tools write it: mean over H x W (or a flatten of a fixed-size image when
    `features` is given), then one Gemm to `classes` scores; the input is fixed at `size` px or left open."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spatial = [size, size] if size else ["h", "w"]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, *spatial])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", classes])
    width = features or 3
    weight = numpy_helper.from_array(np.full((width, classes), 0.01, np.float32), "w")
    first = (helper.make_node("Flatten", ["image"], ["f"]) if features else
             helper.make_node("ReduceMean", ["image"], ["f"], axes=[2, 3], keepdims=0))
    graph = helper.make_graph([first, helper.make_node("Gemm", ["f", "w"], ["logits"])], "foreign", [image],
                              [logits], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def test_an_onnx_file_that_does_not_fit_the_data_is_one_line_naming_the_flag(tmp_path):
    """A foreign ONNX with 1000 outputs on 10 classes gave acc 0.0167 and exit 0; a fixed 224 px input run at 64 px,
    and metadata image_size 'abc', gave tracebacks."""
    from src.config import Config
    from src.deploy.onnx_model import load_onnx
    from src.errors import UserError

    cfg = Config(num_classes=10, image_size=64)
    wide = load_onnx(_foreign_onnx(tmp_path / "wide.onnx"))
    with pytest.raises(UserError, match=r"wide.onnx outputs 1000 class scores but num_classes is 10 \(pass "
                                        r"--num_classes 1000 with data of that many classes"):
        wide.settings(cfg)
    fixed = load_onnx(_foreign_onnx(tmp_path / "fixed.onnx", classes=10, size=224))
    with pytest.raises(UserError, match=r"fixed.onnx was exported for image_size 224 but the config has 64 "
                                        r"\(pass --image_size 224\)"):
        fixed.settings(cfg)
    bad = load_onnx(_foreign_onnx(tmp_path / "bad.onnx", classes=10, metadata={"image_size": "abc"}))
    with pytest.raises(UserError, match=r"bad.onnx has image_size 'abc' in its metadata, which is not a number"):
        bad.settings(cfg)
    # the input's size is left open but the graph needs 224 px: onnxruntime's own error, in one line
    flat = load_onnx(_foreign_onnx(tmp_path / "flat.onnx", classes=10, features=3 * 224 * 224))
    flat.settings(cfg)
    with pytest.raises(UserError, match=r"^onnxruntime cannot run \S+flat.onnx on 2x3x64x64 images: .+ \(pass the "
                                        r"--image_size it was exported for\)$"):
        flat(np.zeros((2, 3, 64, 64), np.float32))
    assert flat(np.zeros((2, 3, 224, 224), np.float32)).shape == (2, 10)
    # a file that leaves the width open (as far as onnxruntime can tell) and gives another: found on the first batch
    from dataclasses import replace

    open_width = replace(wide, outputs=None)
    open_width.settings(cfg)
    with pytest.raises(UserError, match=r"wide.onnx gives outputs of shape 2x1000 where 2 x 10 class scores were "
                                        r"expected"):
        open_width(np.zeros((2, 3, 64, 64), np.float32))


def test_eval_onnx_and_predict_refuse_a_model_with_another_class_count(trained, tmp_path):
    data, _, _ = trained
    foreign = _foreign_onnx(tmp_path / "imagenet.onnx")
    image = str(next((data / "val" / "cat").iterdir()))
    for proc in (run_cli("eval_onnx.py", "--dataset_path", str(data), "--onnx_file", str(foreign), *TINY_NET),
                 run_cli("predict.py", "--onnx_file", str(foreign), image, *TINY_NET)):
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: {foreign} outputs 1000 class scores but num_classes is 2 (pass --num_classes 1000 with data of "
            "that many classes, or export the model trained on this data)"], proc.stderr[-2000:]
        assert "result:" not in proc.stdout


def test_drop_path_changes_no_exported_output(trained, tmp_path):
    """Stochastic depth is training-only: the same checkpoint exported with --drop_path_rate 0.5 gives the ONNX
    model of the net without it, output for output."""
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    outputs = []
    for rate in (0.0, 0.5):
        name = tmp_path / f"dp{rate}"
        proc = run_cli("export.py", "--output_path", str(trained.out), "--file_format", "ONNX", "--file_name",
                       str(name), "--drop_path_rate", str(rate), *TINY_NET)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(ort.InferenceSession(f"{name}.onnx").run(None, {"image": x})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
