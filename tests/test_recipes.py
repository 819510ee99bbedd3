"""Training recipes end to end: an EMA of the weights, gradient clipping, RandAugment, random erasing, mixup/cutmix and
gradient accumulation in one real run (the arithmetic is tested on the train step in test_trainer.py, the policies
in test_augment.py, the mixing in test_mixup.py)."""
from __future__ import annotations

import numpy as np
from conftest import RESULT_LINE, TINY_TRAIN, make_imagefolder, run_cli

from src.engine.checkpoint import read_checkpoint
from src.engine.layouts import read_weights


def test_a_run_with_ema_evaluates_saves_and_serves_the_ema(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=(8, 4))
    out = tmp_path / "out"
    proc = run_cli("train.py", "--dataset_path", str(data), "--output_path", str(out), *TINY_TRAIN,
                   "--epoch_size", "2", "--ema", "True", "--ema_decay", "0.9", "--clip_grad", "True",
                   "--clip_value", "1.0", "--auto_augment", "randaug-m9-mstd0.5-inc1", "--re_prob", "0.25",
                   "--mixup", "0.4", "--cutmix", "1.0", "--gradient_accumulation_steps", "3",
                   "--save_checkpoint_epochs", "1")  # epoch 1's EMA too, for best.ckpt
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "EMA of the weights (decay 0.9, warmed up" in proc.stdout
    assert "mixing train batches (mixup alpha 0.4, cutmix alpha 1, probability 1, cutmix share 0.5" in proc.stdout
    assert "2 steps/epoch (4 batches of 4, the optimizer steps every 3: an effective batch of 12)" in proc.stdout
    last = out / "checkpoint" / "mobilenetv2-2_2.ckpt"  # named by optimizer steps: 4 batches = a group of 3 and 1
    raw, meta = read_checkpoint(last)
    assert meta.ema is True and raw["ema.updates"].asnumpy() == 4  # 2 epochs x 2 optimizer steps
    assert raw["global_step"].asnumpy().reshape(-1)[0] == 4 and meta.step_num == 4
    assert meta.gradient_accumulation_steps == 3 and not any(n.startswith("train_stats.") for n in raw)
    ema = {name[4:]: v.asnumpy() for name, v in raw.items() if name.startswith("ema.") and name != "ema.updates"}
    assert any(k.endswith("moving_mean") for k in ema)  # BatchNorm statistics are averaged too, as mindcv
    # readers of the run's checkpoint (eval, export, fine-tuning) get the EMA, not the last weights
    served = read_weights(last, "checkpoint").params
    for name, value in ema.items():
        np.testing.assert_array_equal(served[name].asnumpy(), value, err_msg=name)
    differs = [n for n in ema if not np.array_equal(ema[n], raw[n].asnumpy())]
    assert differs  # the EMA lags the weights
    # best.ckpt holds the EMA of its epoch, which the periodic checkpoint of that epoch holds too
    best_params, best_meta = read_checkpoint(out / "checkpoint" / "best.ckpt")
    assert best_meta.ema is True and not any(n.startswith("ema.") for n in best_params)
    periodic = read_checkpoint(out / "checkpoint" / f"mobilenetv2-{best_meta.epoch_num}_2.ckpt")[0]
    for name in differs:
        np.testing.assert_array_equal(best_params[name].asnumpy(), periodic[f"ema.{name}"].asnumpy(), err_msg=name)
    # eval.py on the periodic checkpoint reproduces the EMA's val top-1 of epoch 2 in the log
    logged = float(next(line for line in proc.stdout.splitlines() if line.startswith("[Epoch 2] val top1:"))
                   .split("val top1: ")[1].split(",")[0])
    ev = run_cli("eval.py", "--dataset_path", str(data), "--output_path", str(out), "--pretrain_ckpt", str(last),
                 "--width", "0.25", "--image_size", "32", "--num_classes", "2", "--num_parallel_workers", "1")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "using its EMA weights (ema.*)" in ev.stdout + ev.stderr
    assert float(RESULT_LINE.search(ev.stdout).group(1)) == round(logged, 4)
    # per-class results: written by the run's last evaluation and by eval.py; the result line stays the last line
    assert "worst 2 classes by top-1: " in proc.stdout and "worst 2 classes by top-1: " in ev.stdout
    assert ev.stdout.strip().splitlines()[-1].startswith("result:{'acc': ")
    rows = (out / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class,images,top1,top5,most_confused_with,confused_images" and len(rows) == 3
    assert {row.split(",")[0] for row in rows[1:]} == {"cat", "dog"} and all(r.split(",")[1] == "4" for r in rows[1:])
    assert (out / "confusion_matrix.png").stat().st_size > 1000
