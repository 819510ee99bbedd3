"""The model registry: every fact of a net comes from its card, and a new net needs nothing but its own package."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import RESULT_LINE, ROOT, make_imagefolder, run_cli

from src.config import FIELDS, MODEL_NAMES
from src.engine.layouts import Layout
from src.engine.published import PUBLISHED
from src.models.registry import ModelCard, PublishedWeights, cards, family_of, models_of_family, register_model

TINYNET_CARD = '''\
    """TinyNet: one convolution and a classifier, registered the way docs/models.md says."""
    from src.models.registry import ModelCard, register_model

    register_model(ModelCard(name="tinynet", build="src.models.tinynet.net:tinynet", bn_eps=1e-4))
'''
TINYNET_NET = '''\
    from mindspore import nn

    from src.models.common import ClassifierNet, GlobalAvgPooling, conv2d, make_divisible


    class Backbone(nn.Cell):
        def __init__(self, width, bn_eps):
            super().__init__()
            self.out_channels = make_divisible(16 * width)
            self.features = nn.SequentialCell([conv2d(3, self.out_channels, 3, 2),
                                               nn.BatchNorm2d(self.out_channels, eps=bn_eps), nn.ReLU()])

        def construct(self, x):
            return self.features(x)


    class Head(nn.Cell):
        def __init__(self, channels, num_classes):
            super().__init__()
            self.avgpool = GlobalAvgPooling()
            self.classifier = nn.Dense(channels, num_classes)

        def pool(self, x):
            return self.avgpool(x)

        def classify(self, x):
            return self.classifier(x)

        def construct(self, x):
            return self.classify(self.pool(x))


    def tinynet(num_classes, width, dropout, bn_eps, padding):
        backbone = Backbone(width, bn_eps)
        return ClassifierNet(backbone, Head(backbone.out_channels, num_classes), head_prefixes=("classifier.",))
'''


def test_the_config_choices_families_and_short_names_come_from_the_cards():
    assert MODEL_NAMES == tuple(cards()) == FIELDS["model"].metadata["choices"]
    assert models_of_family("mobilenetv3") == ["mobilenetv3_large", "mobilenetv3_small"]
    assert family_of("resnet101") == "resnet" and family_of("not_registered") == "not_registered"
    assert set(PUBLISHED) == {p.name for card in cards().values() for p in card.published}
    assert PUBLISHED["torchvision:resnet101"].model == "resnet101"
    assert Layout("mindcv", "mobilenetv3").name("mobilenetv3_small", 0.75) == "mindcv mobilenet_v3_small_075"
    assert cards()["mobilenetv3_large"].dropout == 0.2 and cards()["mobilenetv3_large"].bn_eps == 1e-3


def test_a_name_registered_twice_is_an_error():
    with pytest.raises(ValueError, match="model 'resnet50' is registered twice"):
        register_model(ModelCard(name="resnet50", build="elsewhere:resnet50"))
    with pytest.raises(ValueError, match="published weights 'mindcv:resnet50' are registered by resnet50 and other"):
        weights = PublishedWeights("mindcv:resnet50", "https://example.org/r50.ckpt", digest_in_name=False)
        register_model(ModelCard(name="other", build="x:y", published=(weights,)))
    assert "other" not in cards() and cards()["resnet50"].build == "src.models.resnet.net:resnet50"


def _copy_with_tinynet(dest: Path) -> Path:
    """The package as a user checks it out, plus one new model package and nothing else."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = {"data", "tests", "output", "docs"} if Path(folder) == ROOT else set()
        return {n for n in names if n in top or n in (".git", "__pycache__", ".pytest_cache")}

    shutil.copytree(ROOT, dest, ignore=ignore)
    package = dest / "src" / "models" / "tinynet"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(TINYNET_CARD))
    (package / "net.py").write_text(textwrap.dedent(TINYNET_NET))
    return dest


def test_a_new_model_trains_evaluates_exports_and_predicts_with_no_other_edit(tmp_path):
    repo = _copy_with_tinynet(tmp_path / "repo")
    data = make_imagefolder(tmp_path / "data")
    out = tmp_path / "out"
    net = ["--model", "tinynet", "--image_size", "32", "--num_classes", "2", "--num_parallel_workers", "1"]
    train = run_cli("train.py", "--dataset_path", str(data), "--output_path", str(out), "--epoch_size", "1",
                    "--batch_size", "4", "--warmup_epochs", "0", *net, cwd=repo)
    assert train.returncode == 0, train.stderr[-3000:]
    best = out / "checkpoint" / "best.ckpt"
    assert (out / "checkpoint" / "tinynet-1_3.ckpt").is_file() and best.is_file()
    # eval and export take the model (and the card's BatchNorm epsilon) from the checkpoint
    evaluation = run_cli("eval.py", "--dataset_path", str(data), "--output_path", str(out), cwd=repo)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert RESULT_LINE.search(evaluation.stdout).group(3) == str(best)
    export = run_cli("export.py", "--output_path", str(out), "--file_format", "ONNX", cwd=repo)
    assert export.returncode == 0, export.stderr[-3000:]
    assert (out / "tinynet.onnx").is_file()
    images = [str(next((data / "val" / c).iterdir())) for c in ("cat", "dog")]
    predict = run_cli("predict.py", "--onnx_file", str(out / "tinynet.onnx"), "--num_classes", "2", *images, cwd=repo)
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert len(re.findall(r"^  ([12])\. (cat|dog)\s+(\d\.\d{4})$", predict.stdout, re.M)) == 4
    # fine-tuning from its own checkpoint onto the same classes (the path that once ended in a KeyError)
    finetune = run_cli("train.py", "--dataset_path", str(data), "--output_path", str(tmp_path / "ft"),
                       "--pretrain_ckpt", str(best), "--epoch_size", "1", "--batch_size", "4", "--run_eval", "False",
                       *net, cwd=repo)
    assert finetune.returncode == 0, finetune.stderr[-3000:]
    listed = subprocess.run([sys.executable, "train.py", "--help"], cwd=repo, capture_output=True, text=True)
    assert "tinynet" in listed.stdout


def test_the_docs_show_the_tinynet_this_test_adds():
    """docs/models.md's "How to add a model" is the code the new-model test runs, word for word."""
    page = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    assert textwrap.dedent(TINYNET_CARD) in page and textwrap.dedent(TINYNET_NET) in page
