"""Config contract: every YAML key is a flag, strict bools, checked choices/ranges, clear unknown-key errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from src.config import FIELDS, ROOT, load_config, save_config
from src.errors import UserError

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_come_from_demo_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo data and config are found from any folder
    cfg = load_config([])
    assert cfg.model == "mobilenetv2" and cfg.dataset_path == "data/digits" and cfg.platform == "CPU"
    assert cfg.resolved_dataset_path() == ROOT / "data" / "digits"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(["--config_path", str(path)])
    assert set(yaml.safe_load(path.read_text())) <= set(FIELDS)
    assert cfg.num_classes >= 2


def test_required_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "mobilenetv2_imagenet.yaml", "mobilenetv2_cifar10.yaml", "resnet50_imagenet.yaml",
            "resnet50_cifar10.yaml", "resnet101_imagenet.yaml", "mobilenetv3_large_imagenet.yaml",
            "mobilenetv3_small_imagenet.yaml"} <= names


def test_seed_recipes():
    mbv2 = load_config(["--config_path", "configs/mobilenetv2_imagenet.yaml"])
    assert (mbv2.momentum, mbv2.weight_decay, mbv2.label_smooth, mbv2.lr_decay_mode) == (0.9, 4e-5, 0.1, "cosine")
    assert mbv2.warmup_epochs > 0
    r50 = load_config(["--config_path", "configs/resnet50_cifar10.yaml"])
    assert (r50.lr_decay_mode, r50.lr_max, r50.loss_scale) == ("poly", 0.1, 1024.0)


# mindcv's configs/mobilenetv3/mobilenet_v3_{large,small}_ascend.yaml with its config.py defaults for the keys the
# yamls leave out (color_jitter 0.4, auto_augment None, re_prob 0, ema/clip_grad False), in this package's names
MINDCV_MOBILENETV3 = {
    "batch_size": 75, "image_size": 224, "num_classes": 1000, "crop_scale_min": 0.08, "random_flip": 0.5,
    "color_jitter": 0.4, "auto_augment": None, "re_prob": 0.0, "dataset_sink_mode": True, "amp_level": "O3",
    "label_smooth": 0.1, "lr_decay_mode": "cosine", "lr_init": 0.0, "lr_end": 0.0, "warmup_epochs": 4,
    "momentum": 0.9, "weight_decay": 2e-5, "loss_scale": 1024.0, "loss_scale_type": "fixed", "ema": False,
    "clip_grad": False, "dropout": 0.2, "keep_checkpoint_max": 30, "num_parallel_workers": 8, "width": 1.0,
}


def test_mobilenetv3_recipes_are_mindcvs():
    large = load_config(["--config_path", "configs/mobilenetv3_large_imagenet.yaml"])
    small = load_config(["--config_path", "configs/mobilenetv3_small_imagenet.yaml"])
    for cfg, model, lr, epochs in ((large, "mobilenetv3_large", 1.08, 420), (small, "mobilenetv3_small", 0.77, 470)):
        assert (cfg.model, cfg.lr_max, cfg.epoch_size) == (model, lr, epochs)
        assert {key: getattr(cfg, key) for key in MINDCV_MOBILENETV3} == MINDCV_MOBILENETV3
        assert (cfg.crop_pct or 0.875, cfg.interpolation or "bilinear") == (0.875, "bilinear")
    strong = load_config(["--config_path", "configs/mobilenetv3_large_imagenet_strong.yaml"])
    added = {"auto_augment": "randaug-m9-mstd0.5-inc1", "re_prob": 0.2, "ema": True}
    assert {key: getattr(strong, key) for key in MINDCV_MOBILENETV3} == {**MINDCV_MOBILENETV3, **added}
    assert (strong.lr_max, strong.epoch_size, strong.ema_decay) == (1.08, 420, 0.9999)


def test_seed_flag_spellings_map_to_the_config_keys():
    cfg = load_config(["--data-path=/data/ILSVRC2012", "--lr=0.001", "--batch-size=64", "--epochs=10",
                       "--pretrained=mobilenet_v3_small.ckpt", "--pact_quant", "--model", "mobilenetv3_small"])
    assert (cfg.dataset_path, cfg.lr_max, cfg.batch_size, cfg.epoch_size, cfg.pretrain_ckpt, cfg.pact_quant) == (
        "/data/ILSVRC2012", 0.001, 64, 10, "mobilenet_v3_small.ckpt", True)
    assert load_config(["--pact_quant", "False", "--run_eval"]).pact_quant is False
    with pytest.raises(UserError, match=r"did you mean --epochs \(= --epoch_size\)\?"):
        load_config(["--epoch", "3"])


def test_checkpoint_flag_spellings_are_shared_by_eval_and_export(tmp_path: Path):
    # eval.py reads --pretrain_ckpt (ModelZoo), export.py/predict.py --ckpt_file; each tool takes both spellings
    assert load_config(["--ckpt_file", "a.ckpt"], "eval").pretrain_ckpt == "a.ckpt"
    for tool in ("export", "predict"):
        assert load_config(["--pretrained", "b.ckpt"], tool).ckpt_file == "b.ckpt"
        assert load_config(["--pretrain_ckpt", "b.ckpt"], tool).ckpt_file == "b.ckpt"
    # eval_onnx.py reads --onnx_file (as predict.py) and export.py's --file_name
    assert load_config(["--file_name", "m.onnx"], "eval_onnx").onnx_file == "m.onnx"
    assert load_config(["--onnx_file", "m.onnx"], "predict").onnx_file == "m.onnx"
    assert load_config([], "export").batch_size == 1  # a tool's own default
    # a saved run config names the checkpoint it was fine-tuned from: export must not pick that up
    saved = tmp_path / "config.yaml"
    saved.write_text("pretrain_ckpt: imagenet.ckpt\n")
    cfg = load_config(["--config_path", str(saved)], "export")
    assert (cfg.ckpt_file, cfg.pretrain_ckpt) == (None, "imagenet.ckpt")


def test_every_key_is_a_flag_and_overrides_yaml():
    cfg = load_config(["--batch_size", "7", "--lr_max=0.5", "--pretrain_ckpt", "x.ckpt", "--model", "resnet50"])
    assert (cfg.batch_size, cfg.lr_max, cfg.pretrain_ckpt, cfg.model) == (7, 0.5, "x.ckpt", "resnet50")


@pytest.mark.parametrize("word,value", [("True", True), ("true", True), ("1", True),
                                        ("False", False), ("false", False), ("0", False)])
def test_bools_accept_only_the_six_words(word, value):
    assert load_config(["--run_eval", word]).run_eval is value


@pytest.mark.parametrize("word", ["yes", "no", "TRUE", "", "2"])
def test_other_bool_words_are_refused(word):
    with pytest.raises(UserError, match="True/False/true/false/1/0"):
        load_config(["--run_eval", word])


@pytest.mark.parametrize("argv,message", [
    (["--bach_size", "3"], r"unknown flag 'bach_size' \(did you mean --batch_size\?.*valid keys: model,"),
    (["--platform", "TPU"], r"--platform got 'TPU' \(choose from CPU, GPU, Ascend\)"),
    (["--batch_size", "0"], r"--batch_size got 0 \(must be at least 1\)"),
    (["--batch_size", "3.5"], r"--batch_size got '3.5' \(use an integer\)"),
    (["--lr_max", "fast"], r"--lr_max got 'fast' \(use a number\)"),
    (["--amp_level", "O4"], r"choose from O0, O1, O2, O3"),
    (["--model", "vgg16"], r"choose from mobilenetv2, mobilenetv3_large, mobilenetv3_small, resnet50, resnet101"),
    (["stray"], r"unexpected argument 'stray'"),
    (["--config_path", "nope.yaml"], r"config file nope.yaml not found"),
    (["--model", "resnet50", "--width", "0.5"], r"width applies to the MobileNets only"),
    # non-finite numbers in any float key would train to nan (or silently switch a check off)
    (["--lr_max", "nan"], r"--lr_max got 'nan' \(use a finite number: peak learning rate"),
    (["--momentum", "inf"], r"--momentum got 'inf' \(use a finite number"),
    (["--label_smooth=-inf"], r"--label_smooth got '-inf' \(use a finite number"),
    (["--warmup_epochs", "NaN"], r"--warmup_epochs got 'NaN' \(use a finite number"),
    (["--width", "nan"], r"--width got 'nan' \(use a finite number"),
    (["--crop_scale_min", "nan"], r"--crop_scale_min got 'nan'"),
    (["--weight_decay", "nan"], r"--weight_decay got 'nan'"),
    (["--dropout", "nan"], r"--dropout got 'nan'"),
    (["--lr_max", "1e999"], r"--lr_max got '1e999' \(use a finite number"),
    (["--seed", str(2**32)], r"--seed got 4294967296 \(must be at most 4294967295\)"),
    (["--config_path", "configs"], r"config file \S*configs is a folder \(pass a YAML file with --config_path"),
])
def test_bad_input_names_the_fix(argv, message):
    with pytest.raises(UserError, match=message):
        load_config(argv)


def test_unknown_yaml_key_is_refused(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: mobilenetv2\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match=r"unknown key in .*bad.yaml 'learning_rate'.*valid keys"):
        load_config(["--config_path", str(bad)])


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = load_config(["--epoch_size", "3", "--pretrain_ckpt", "a.ckpt"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(["--config_path", str(tmp_path / "config.yaml")])
    assert again == cfg


def test_docs_document_every_key():
    # the key reference moved from the README to docs/config.md (generated; tests/test_docs.py checks it is current)
    reference = (ROOT / "docs" / "config.md").read_text()
    missing = [name for name in FIELDS if f"| `{name}`" not in reference]
    assert not missing, f"docs/config.md lacks keys: {missing} (run python tools/make_config_docs.py)"


def test_yaml_nan_and_duplicate_keys_and_encoding_are_refused(tmp_path: Path):
    cases = {"nan.yaml": ("lr_max: .nan\n", r"--lr_max got nan \(use a finite number"),
             "dup.yaml": ("lr_max: 0.1\nbatch_size: 8\nlr_max: 0.2\n",
                          r"dup.yaml: key 'lr_max' appears twice \(lines 1 and 3; keep one\)"),
             "latin1.yaml": ("model: mobilenetv2 # caf\xe9\n".encode("latin-1"),
                             r"latin1.yaml is not UTF-8 text \(invalid continuation byte at byte 24; save it as UTF-8")}
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(UserError, match=message):
            load_config(["--config_path", str(path)])


SEED_COMMAND = ("--arch mobilenet_v3_large --data /data/imagenet --batch_size 128 --learning-rate 0.064 "
                "--print-freq 10 --epochs 600 --apex --apex-opt-level O2 --lr-step-size 2 --lr-gamma 0.973 "
                "--wd 0.00001 --device_id 3 --workers 16 --max_steps 100 --opt rmsprop --momentum 0.9")
NATIVE_COMMAND = ("--model mobilenetv3_large --dataset_path /data/imagenet --batch_size 128 --lr_max 0.064 "
                  "--print_freq 10 --epoch_size 600 --amp_level O2 --lr_decay_mode step --lr_step_size 2 "
                  "--lr_gamma 0.973 --weight_decay 0.00001 --device_id 3 --num_parallel_workers 16 --max_steps 100 "
                  "--opt rmsprop --momentum 0.9")


@pytest.mark.parametrize("tool", ["train", "eval", "benchmark"])
def test_the_pytorch_seeds_command_line_is_the_native_one(tool):
    """pytorch_ascend_mobilenetv3.md's flags (its 公共参数 list) on every entry point: the same Config as the native
    keys, and the same keys counted as given on the command line."""
    from src.config import given_on_command_line

    seed, native = load_config(SEED_COMMAND.split(), tool), load_config(NATIVE_COMMAND.split(), tool)
    assert seed == native
    assert given_on_command_line(seed) == given_on_command_line(native)
    assert (seed.model, seed.amp_level, seed.lr_decay_mode, seed.lr_step_size) == ("mobilenetv3_large", "O2", "step",
                                                                                    2.0)


def test_peer_names_of_the_nets_and_the_seed_rules():
    for name, own in (("mobilenet_v3_small", "mobilenetv3_small"), ("mobilenetv3_large_100", "mobilenetv3_large"),
                      ("mobilenet_v3_large_100", "mobilenetv3_large"), ("mobilenet_v2", "mobilenetv2"),
                      ("resnet101", "resnet101")):
        assert load_config(["--arch", name]).model == own
    with pytest.raises(UserError, match="--model got 'mobilenet_v3_huge' \\(choose from mobilenetv2, "):
        load_config(["--arch", "mobilenet_v3_huge"])
    assert load_config(["--apex"]).amp_level == "O1"  # apex's own default level
    assert load_config(["--apex", "False", "--amp_level", "O3"]).amp_level == "O3"
    with pytest.raises(UserError, match=r"^--apex-opt-level O2 applies with --apex \(the seed trains in float32 "):
        load_config(["--apex-opt-level", "O2"])
    with pytest.raises(UserError, match="--apex sets amp_level O1 but --amp_level O3 is given too"):
        load_config(["--apex", "--amp_level", "O3"])
    # a step size on the command line means the step schedule, unless the schedule is given too
    assert load_config(["--lr_step_size", "3"]).lr_decay_mode == "step"
    assert load_config(["--lr-step-size", "3", "--lr_decay_mode", "step"]).lr_decay_mode == "step"
    # apex's dynamic loss scale from 2**16 off CPU (CPU has none), unless a loss scale is given
    gpu = load_config(["--apex", "O2", "--platform", "GPU"])
    assert (gpu.amp_level, gpu.loss_scale_type, gpu.loss_scale) == ("O2", "dynamic", 65536.0)
    assert load_config(["--apex", "--platform", "GPU", "--loss_scale", "128"]).loss_scale_type == "fixed"
    assert load_config(["--apex"]).loss_scale_type == "fixed"


@pytest.mark.parametrize("args, message", [
    (["--lr_decay_mode", "multistep"], "--lr_decay_mode multistep needs --lr_milestones"),
    (["--lr_decay_mode", "multistep", "--lr_milestones", "30,20"], "--lr_milestones got '30,20' (give increasing"),
    (["--lr_milestones", "3,6"], "--lr_milestones applies to --lr_decay_mode multistep, not cosine"),
    (["--num_cycles", "3", "--lr_decay_mode", "step"], "--num_cycles applies to --lr_decay_mode cosine, not step"),
    (["--opt", "nesterov", "--momentum", "0"], "--nesterov True needs --momentum above 0"),
    (["--opt", "adamax"], "--opt got 'adamax' (choose from sgd, momentum, nesterov, rmsprop, rmsproptf, adam, adamw, "
                          "lamb)"),
    (["--eps", "0"], "--eps got 0.0 (must be at least 1e-12)"),
    (["--lr_gamma", "0.5"], "--lr_gamma applies to --lr_decay_mode step and multistep and exponential, not cosine"),
    (["--lr_step_size", "3", "--lr_decay_mode", "poly"], "--lr_step_size applies to --lr_decay_mode step, not poly"),
    (["--apex", "fast"], "--apex got 'fast' (use --apex alone, --apex False, or --apex --apex-opt-level O1|O2|O3)"),
    (["--eps", "1e-3"], "--eps applies to rmsprop, rmsproptf, adam, adamw and lamb, not momentum (drop --eps)"),
    (["--opt", "adam", "--nesterov", "True"], "--nesterov applies to --opt sgd and momentum, not adam"),
])
def test_recipe_keys_refuse_what_cannot_work(args, message):
    with pytest.raises(UserError) as err:
        load_config(args)
    assert str(err.value).startswith(message)


def test_milestones_are_kept_in_one_spelling():
    assert load_config(["--lr_decay_mode", "multistep", "--lr_milestones", "[30, 60 ,90]"]).lr_milestones == "30,60,90"


# the published commands (torchvision references/classification/README.md; timm's README at c16f25ce), in the
# spellings this package reads; -b, -j, --amp, --lr-noise, --remode and --warmup-epochs' old default are in the yamls
TORCHVISION_MOBILENETV3 = ("--model mobilenet_v3_large --epochs 600 --opt rmsprop --batch-size 128 --lr 0.064 "
                           "--wd 0.00001 --lr-step-size 2 --lr-gamma 0.973 --auto-augment imagenet --random-erase 0.2")
TIMM_MOBILENETV3 = ("--model mobilenetv3_large_100 --sched step --epochs 600 --decay-epochs 2.4 --decay-rate .973 "
                    "--opt rmsproptf --opt-eps .001 --warmup-lr 1e-6 --weight-decay 1e-5 --drop 0.2 --drop-path 0.2 "
                    "--model-ema --model-ema-decay 0.9999 --aa rand-m9-mstd0.5 --reprob 0.2 --lr .064")


@pytest.mark.parametrize("name, command, defaults", [
    ("mobilenetv3_large_imagenet_torchvision.yaml", TORCHVISION_MOBILENETV3,
     {"momentum": 0.9, "eps": 0.0316, "rmsprop_alpha": 0.9, "label_smooth": 0.0, "warmup_epochs": 0.0,
      "filter_bias_and_bn": False, "lr_step_per_epoch": True, "ema": False, "amp_level": "O0", "dropout": 0.2,
      "bn_eps": 1e-3, "interpolation": "bilinear", "crop_pct": 0.875}),
    ("mobilenetv3_large_imagenet_timm.yaml", TIMM_MOBILENETV3,
     {"momentum": 0.9, "rmsprop_alpha": 0.9, "label_smooth": 0.1, "warmup_epochs": 3.0, "filter_bias_and_bn": True,
      "lr_step_per_epoch": True, "amp_level": "O1", "bn_eps": 1e-5, "interpolation": "bicubic", "crop_pct": 0.875}),
])
def test_the_peers_mobilenetv3_recipes_are_their_published_commands(name, command, defaults):
    """Each key the published command sets has its value in the config; the rest are the source's defaults."""
    from src.config import given_on_command_line

    published = load_config(command.split())
    recipe = load_config(["--config_path", f"configs/{name}"])
    keys = given_on_command_line(published) - {"auto_augment"}
    assert {k: getattr(recipe, k) for k in keys} == {k: getattr(published, k) for k in keys}
    from src.policy import parse_policy

    assert parse_policy(recipe.auto_augment) == parse_policy(published.auto_augment)
    assert {k: getattr(recipe, k) for k in defaults} == defaults
    assert len(keys) >= 10 and "not reproduced here" in (ROOT / "configs" / name).read_text()


def test_the_paddle_seeds_recipe():
    """PaddlePaddle/models tutorials/mobilenetv3_prod/Step6 (shell/train_dist.sh, train.py): MobileNetV3-Small,
    8 x 256, lr 0.8, x0.1 every 30 of 120 epochs, momentum 0.9, weight decay 1e-4 on every parameter."""
    cfg = load_config(["--config_path", "configs/mobilenetv3_small_imagenet_paddle.yaml"])
    assert (cfg.model, cfg.batch_size, cfg.lr_max, cfg.epoch_size, cfg.lr_decay_mode, cfg.lr_step_size,
            cfg.lr_gamma) == ("mobilenetv3_small", 256, 0.8, 120, "step", 30.0, 0.1)
    assert (cfg.opt, cfg.momentum, cfg.weight_decay, cfg.filter_bias_and_bn, cfg.warmup_epochs,
            cfg.label_smooth) == ("momentum", 0.9, 1e-4, False, 0.0, 0.0)
    from src.engine.lr_schedule import schedule_of

    lr = schedule_of(cfg, 1)
    assert [lr[e] for e in (0, 29, 30, 59, 60, 90, 119)] == pytest.approx([0.8, 0.8, 0.08, 0.08, 0.008, 8e-4, 8e-4])
