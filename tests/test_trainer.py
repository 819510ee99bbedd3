"""The training step: identical to MindSpore's TrainOneStepCell, plus train statistics summed on the device; loss
scaling and AMP on CPU."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from src.config import Config
from src.engine.loss import CrossEntropySmooth
from src.engine.train_step import LossAndLogits, TrainStep, build_train_step, loss_scale_sense

ms.set_context(mode=ms.GRAPH_MODE)


class TinyNet(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, weight_init="ones")
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Dense(4, 3, weight_init="ones", bias_init="zeros")

    def construct(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def _batch():
    rng = np.random.default_rng(0)
    return Tensor(rng.standard_normal((4, 3, 8, 8)).astype(np.float32)), Tensor(np.array([0, 1, 2, 1], np.int32))


def _weights(net):
    return {p.name: p.asnumpy().copy() for p in net.trainable_params()}


@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_train_step_matches_mindspore_train_one_step(scale):
    x, y = _batch()
    ref_net, our_net = TinyNet(), TinyNet()
    loss = CrossEntropySmooth(3, 0.1)
    ref = nn.TrainOneStepCell(nn.WithLossCell(ref_net, loss), nn.Momentum(ref_net.trainable_params(), 0.1, 0.9))
    ours = TrainStep(LossAndLogits(our_net, loss), nn.Momentum(our_net.trainable_params(), 0.1, 0.9),
                     Tensor(scale, ms.float32), check_overflow=False, num_classes=3)
    ref.set_train()
    ours.set_train()
    for _ in range(2):
        ref_loss = ref(x, y)
        our_loss = ours(x, y)
        np.testing.assert_allclose(our_loss.asnumpy(), ref_loss.asnumpy(), rtol=1e-5)
    for name, value in _weights(ref_net).items():
        np.testing.assert_allclose(_weights(our_net)[name], value, rtol=1e-4, atol=1e-6)


def test_train_step_sums_loss_and_top_k_hits_on_the_device():
    """What the log line reports: mean loss per step and top-1/top-5 hit rates since the last read, then zeroed."""
    x, y = _batch()
    net = TinyNet()
    step = TrainStep(LossAndLogits(net, CrossEntropySmooth(3, 0.0)), nn.Momentum(net.trainable_params(), 0.1, 0.9),
                     Tensor(1.0, ms.float32), check_overflow=False, num_classes=3)
    step.set_train()
    expected_hits, losses = [], []
    for _ in range(3):
        logits = net(x).asnumpy()  # the weights this step sees
        expected_hits.append((logits.argmax(1) == y.asnumpy()).sum())
        losses.append(float(step(x, y).asnumpy()))
    window = step.stats.read()
    assert window["steps"] == 3 and window["images"] == 12
    assert window["loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert window["top1"] == pytest.approx(sum(expected_hits) / 12)
    assert window["top5"] == 1.0  # 3 classes: every label is among the top 3
    assert step.stats.read() == {"loss": 0.0, "top1": 0.0, "top5": 0.0, "steps": 0, "images": 0}
    step(x, y)
    assert step.stats.read()["steps"] == 1


def test_cpu_dynamic_loss_scale_falls_back_to_fixed(caplog):
    cfg = Config(platform="CPU", loss_scale_type="dynamic", loss_scale=1024.0)
    with caplog.at_level("WARNING", logger="train"):
        sense, check = loss_scale_sense(cfg)
    assert check is False and float(sense.asnumpy()) == 1024.0
    assert "fixed loss scale" in caplog.text


@pytest.mark.e2e  # builds full-size nets or trains in this process: seconds each
@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_amp_levels_train_on_cpu(level, tmp_path, monkeypatch):
    """Each level compiles and steps on CPU: finite losses, every trainable weight updated and finite."""
    from src.device import set_seed
    from src.engine.lr_schedule import build_lr_schedule
    from src.models import create_model

    monkeypatch.chdir(tmp_path)
    # loss scale 1: on CPU there is no overflow check, and a fixed scale of 1024 overflows this net's float16
    # gradients in one step (the weights become inf/nan; checkpoint.check_finite refuses to save them)
    cfg = Config(model="mobilenetv2", width=0.25, num_classes=3, amp_level=level, loss_scale=1.0,
                 keep_batchnorm_fp32=level != "O3", output_path=str(tmp_path / "out"))
    # float16 on MindSpore's CPU kernels overflows to nan within 3 steps from some starts of this tiny net (seeds 0
    # and 2 at O1), which is why the package warns against AMP on CPU and its divergence error names --amp_level O0;
    # this test checks that each level compiles and steps, from a fixed start that does not overflow
    set_seed(1)
    net = create_model("mobilenetv2", 3, 0.25)
    before = list(_weights(net).items())
    step, _ = build_train_step(net, cfg, build_lr_schedule("cosine", 0.0, 0.01, 0.0, 0, 1, 3), batches_per_epoch=3)
    x = Tensor(np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32))
    y = Tensor(np.array([0, 2], np.int32))
    losses = [float(step(x, y).asnumpy()) for _ in range(3)]
    assert all(np.isfinite(losses)), losses
    after = list(_weights(net).items())
    assert [name for name, _ in after] == [name for name, _ in before]  # checkpoints keep the plain net's names
    after = [value for _, value in after]
    assert all(np.isfinite(v).all() for v in after)
    # every conv/dense weight took an update (a BatchNorm beta's float16 gradient may underflow to 0 at O3)
    unchanged = [name for (name, old), new in zip(before, after)
                 if name.endswith("weight") and np.array_equal(old, new)]
    assert not unchanged, unchanged
    assert not (tmp_path / "rewritten_network").exists()  # MindSpore's O1 rewrite stays in output_path


def _step(net, lr=0.1, momentum=0.9, **kwargs):
    step = TrainStep(LossAndLogits(net, CrossEntropySmooth(3, 0.0)), nn.Momentum(net.trainable_params(), lr, momentum),
                     Tensor(1.0, ms.float32), check_overflow=False, num_classes=3, **kwargs)
    step.set_train()
    return step


def test_clip_grad_bounds_the_global_norm_of_the_update():
    """SGD with lr 1 and no momentum moves the weights by minus the gradient: clipped, its global norm is the bound,
    in the unclipped gradient's direction; a bound above the norm changes nothing."""
    x, y = _batch()
    deltas = {}
    for clip in (None, 0.05, 1e6):
        net = TinyNet()
        before = _weights(net)
        _step(net, lr=1.0, momentum=0.0, clip_value=clip)(x, y)
        deltas[clip] = np.concatenate([(before[k] - v).ravel() for k, v in _weights(net).items()])
    norm = np.linalg.norm(deltas[None])
    assert norm > 0.05
    assert np.linalg.norm(deltas[0.05]) == pytest.approx(0.05, rel=1e-4)
    np.testing.assert_allclose(deltas[0.05], deltas[None] * 0.05 / norm, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(deltas[1e6], deltas[None], rtol=1e-5, atol=1e-7)


def _all_params(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def test_ema_follows_the_hand_computed_update_over_three_steps_and_a_resume():
    """e_t = d_t e_(t-1) + (1 - d_t) w_t with d_t = decay (1 - exp(-t / 2000)), over every parameter (BatchNorm
    statistics too), from e_0 = the initial weights; a train step rebuilt from a checkpoint continues it."""
    from src.engine.checkpoint import load_into

    decay = 0.9999
    x, y = _batch()
    net = TinyNet()
    step = _step(net, ema_decay=decay)
    expected = _all_params(net)
    saved = None
    for t in range(1, 4):
        step(x, y)
        d = decay * (1 - np.exp(-t / 2000))
        expected = {k: d * expected[k] + (1 - d) * w for k, w in _all_params(net).items()}
        if t == 2:
            saved = {p.name: ms.Parameter(p.asnumpy().copy(), name=p.name) for p in step.get_parameters()}
    ema = {p.name[len("ema."):]: p.asnumpy() for p in step.get_parameters() if p.name.startswith("ema.")}
    assert float(ema.pop("updates")) == 3 and set(ema) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(ema[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert not np.allclose(ema["fc.weight"], _all_params(net)["fc.weight"])  # it lags the weights

    # resume after step 2: a new net and step, loaded from the saved train-step parameters, take step 3
    resumed_net = TinyNet()
    resumed = _step(resumed_net, ema_decay=decay)
    load_into(resumed, saved, "saved")
    resumed(x, y)
    for p in resumed.get_parameters():
        if p.name.startswith("ema.") and p.name != "ema.updates":
            np.testing.assert_allclose(p.asnumpy(), ema[p.name[4:]], rtol=1e-5, atol=1e-7, err_msg=p.name)


class NoBatchNormNet(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, weight_init="normal", has_bias=True)
        self.fc = nn.Dense(4, 3, weight_init="normal", bias_init="zeros")

    def construct(self, x):
        return self.fc(ms.ops.relu(self.conv(x)).mean((2, 3)))


def _same_start(net, reference):
    for p, r in zip(net.get_parameters(), reference.get_parameters()):
        p.set_data(Tensor(r.asnumpy().copy()))
    return net


@pytest.mark.parametrize("clip", [None, 0.05])
def test_accumulating_n_batches_of_b_equals_one_batch_of_n_times_b(clip):
    """Without BatchNorm, 3 micro-batches of 4 give the same momentum-SGD update (twice over, so the momentum is
    used) as one batch of 12, and the EMA and the optimizer's step count move once per optimizer step."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 12).astype(np.int32)
    whole_net = NoBatchNormNet()
    micro_net = _same_start(NoBatchNormNet(), whole_net)
    whole = _step(whole_net, clip_value=clip, ema_decay=0.9)
    micro = _step(micro_net, clip_value=clip, ema_decay=0.9, accumulation=3, steps_per_epoch=6)
    for _ in range(2):
        whole(Tensor(x), Tensor(y))
        for i in range(3):
            micro(Tensor(x[4 * i:4 * i + 4]), Tensor(y[4 * i:4 * i + 4]))
    moved = _weights(whole_net)
    assert not np.allclose(moved["fc.weight"], _weights(NoBatchNormNet())["fc.weight"])
    for name, value in moved.items():
        np.testing.assert_allclose(_weights(micro_net)[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    assert int(micro.optimizer.global_step.asnumpy().reshape(-1)[0]) == 2
    ema = {p.name: p.asnumpy() for p in micro.get_parameters() if p.name.startswith("ema.")}
    assert float(ema.pop("ema.updates")) == 2
    whole_ema = {p.name: p.asnumpy() for p in whole.get_parameters() if p.name.startswith("ema.")}
    for name, value in ema.items():
        np.testing.assert_allclose(value, whole_ema[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert all(not p.asnumpy().any() for p in micro.accum_grads)  # emptied after each optimizer step


def test_an_epochs_last_short_group_steps_with_its_own_mean():
    """5 batches per epoch, accumulation 2: steps after batches 2, 4 and 5 (the last alone, not mixed into the next
    epoch's first group), each with the mean gradient of its own batches."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 4, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, (5, 4)).astype(np.int32)
    ref_net = NoBatchNormNet()
    net = _same_start(NoBatchNormNet(), ref_net)
    ref = _step(ref_net, momentum=0.0)
    step = _step(net, momentum=0.0, accumulation=2, steps_per_epoch=5)
    steps_seen = []
    for _epoch in range(2):
        for group in ([0, 1], [2, 3], [4]):
            ref(Tensor(x[group].reshape(-1, 3, 8, 8)), Tensor(y[group].reshape(-1)))
            for b in group:
                step(Tensor(x[b]), Tensor(y[b]))
                steps_seen.append(int(step.optimizer.global_step.asnumpy().reshape(-1)[0]))
    assert steps_seen == [0, 1, 1, 2, 3, 3, 4, 4, 5, 6]
    for name, value in _weights(ref_net).items():
        np.testing.assert_allclose(_weights(net)[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("opt", ["momentum", "sgd", "rmsprop", "rmsproptf", "adam", "adamw", "lamb"])
def test_a_resumed_optimizer_continues_on_the_same_curve(opt, tmp_path):
    """Steps 1-4 uninterrupted, against steps 1-2, a periodic checkpoint written and read as the run does, and
    steps 3-4 in a rebuilt train step: the same weights and moments after each step (the moments and the global
    step, which indexes the per-step LR, come back from the file; a step LR that halves every step shows a wrong
    index at once)."""
    from src.engine.checkpoint import NOT_RESTORED, load_into, read_checkpoint, save_checkpoint
    from src.engine.lr_schedule import build_lr_schedule

    cfg = Config(opt=opt, weight_decay=1e-3, momentum=0.9, num_classes=3, label_smooth=0.0)
    lr = build_lr_schedule("step", 0.0, 0.05, 0.0, 0, 4, 1, step_size=1, gamma=0.5)
    x, y = _batch()

    def fresh():
        step, _ = build_train_step(TinyNet(), cfg, lr, batches_per_epoch=1)
        return step

    step = fresh()
    after = []
    for _ in range(4):
        step(x, y)
        after.append(_all_params(step))
        if len(after) == 2:
            ckpt = tmp_path / f"tiny-2_{opt}.ckpt"
            save_checkpoint([{"name": p.name, "data": p} for p in step.get_parameters()
                             if not p.name.startswith("train_stats.")], ckpt, {"epoch_num": 2, "opt": opt})
    params, meta = read_checkpoint(ckpt)
    prefixes = ("moments.", "accum.", "mean_square.", "moment1.", "adam_m.", "lamb_m.")
    assert meta.opt == opt and any(n.startswith(prefixes) for n in params)
    resumed = fresh()
    load_into(resumed, params, ckpt, skip=NOT_RESTORED)
    assert int(resumed.optimizer.global_step.asnumpy().reshape(-1)[0]) == 2
    for expected in after[2:]:
        resumed(x, y)
        got = _all_params(resumed)
        for name, value in expected.items():
            if not name.startswith("train_stats."):
                np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7, err_msg=f"{opt}: {name}")
    assert not np.allclose(after[2]["fc.weight"], after[3]["fc.weight"])  # the steps moved the weights


def test_a_resume_without_the_optimizers_state_is_refused(tmp_path):
    """Defence behind the --opt check: a checkpoint whose optimizer entries are not this optimizer's would leave its
    moments at zero, so the run refuses it naming the first missing entry."""
    from src.engine.checkpoint import CheckpointMeta
    from src.engine.run import Resume, _restore_training_state
    from src.errors import UserError

    lr = np.full(4, 0.01, np.float32)
    momentum, _ = build_train_step(TinyNet(), Config(num_classes=3), lr, batches_per_epoch=1)
    params = {p.name: p for p in momentum.get_parameters() if not p.name.startswith("train_stats.")}
    resume = Resume(params, CheckpointMeta(epoch_num=1), tmp_path / "m-1_1.ckpt")
    rmsprop, _ = build_train_step(TinyNet(), Config(num_classes=3, opt="rmsprop"), lr, batches_per_epoch=1)
    with pytest.raises(UserError, match=r"m-1_1.ckpt holds no mean_square.conv.weight \(10 optimizer entries of "
                                        r"--opt rmsprop are missing; resume with the optimizer it was trained with"):
        _restore_training_state(Config(num_classes=3, opt="rmsprop", resume_ckpt=str(resume.path)), rmsprop, resume)
    assert _restore_training_state(Config(num_classes=3, resume_ckpt=str(resume.path)),
                                   build_train_step(TinyNet(), Config(num_classes=3), lr, 1)[0], resume) == 1
