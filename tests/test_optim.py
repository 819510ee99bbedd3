"""Every optimizer's first updates against a reference (torch.optim, timm's RMSpropTF formula, the LAMB paper) on
the same weights and gradients, with weight decay on and a BatchNorm weight and a bias that must not decay; every
LR schedule against torch's schedulers stepped the same way."""
from __future__ import annotations

import math
import os

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Parameter, Tensor

from src.config import OPTIMIZERS, Config
from src.engine.lr_schedule import build_lr_schedule, schedule_of
from src.engine.optimizer import create_optimizer

SHAPES = {"conv.weight": (4, 3, 3, 3), "bn.gamma": (4,), "fc.weight": (3, 4), "fc.bias": (3,)}
DECAYED = ("conv.weight", "fc.weight")
LR = np.array([0.1, 0.05, 0.02], np.float32)  # one per step: the optimizer indexes it with its global step
WD = 0.05


@pytest.fixture
def graph_mode():
    """The optimizer runs compiled, as inside the train step."""
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=mode)


def _start():
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
    grads = [{name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
             for _ in range(len(LR))]
    return weights, grads


OWN_CELLS = ("rmsprop", "rmsproptf", "adam", "adamw", "lamb")  # this package's; on CPU one C++ pass (optim.cc)


def _ours(opt: str, **keys) -> list[dict]:
    """The weights after each of 3 updates by this package's optimizer."""
    weights, grads = _start()
    params = [Parameter(Tensor(value), name=name) for name, value in weights.items()]
    cfg = Config(opt=opt, weight_decay=WD, **keys)
    optimizer = create_optimizer(params, LR, cfg)
    if opt in OWN_CELLS:  # the path the test's parameter asks for runs
        assert (optimizer.kernel is not None) == (os.environ.get("CLS_CPU_KERNELS") != "mindspore")
    out = []
    for g in grads:
        optimizer(tuple(Tensor(g[p.name]) for p in params))
        out.append({p.name: p.asnumpy().copy() for p in params})
    assert int(optimizer.global_step.asnumpy().reshape(-1)[0]) == len(LR)
    return out


def _torch(make, decoupled_wd=WD) -> list[dict]:
    weights, grads = _start()
    params = {name: torch.nn.Parameter(torch.tensor(value)) for name, value in weights.items()}
    groups = [{"params": [params[n] for n in DECAYED], "weight_decay": decoupled_wd},
              {"params": [p for n, p in params.items() if n not in DECAYED], "weight_decay": 0.0}]
    optimizer = make(groups)
    out = []
    for lr, g in zip(LR, grads):
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
        for name, p in params.items():
            p.grad = torch.tensor(g[name])
        optimizer.step()
        out.append({name: p.detach().numpy().copy() for name, p in params.items()})
    return out


def _rmsprop_tf(momentum: float, alpha: float, eps: float) -> list[dict]:
    """timm's RMSpropTF (timm/optim/rmsprop_tf.py, lr_in_momentum=True, coupled decay): the mean square starts at 1,
    eps inside the square root."""
    weights, grads = _start()
    square = {n: np.ones_like(w) for n, w in weights.items()}
    buf = {n: np.zeros_like(w) for n, w in weights.items()}
    out = []
    for lr, g in zip(LR, grads):
        for n, w in weights.items():
            grad = g[n] + (WD * w if n in DECAYED else 0)
            square[n] = alpha * square[n] + (1 - alpha) * grad ** 2
            buf[n] = momentum * buf[n] + lr * grad / np.sqrt(square[n] + eps)
            weights[n] = w - buf[n]
        out.append({n: w.copy() for n, w in weights.items()})
    return out


def _lamb(beta1: float, beta2: float, eps: float) -> list[dict]:
    """The LAMB update, Algorithm 2 of You et al. 2019 (arXiv:1904.00962): bias-corrected Adam ratio plus decoupled
    decay, scaled per layer by ||w|| / ||r + decay * w||; layers without decay unscaled (timm's always_adapt=False)."""
    weights, grads = _start()
    m = {n: np.zeros_like(w) for n, w in weights.items()}
    v = {n: np.zeros_like(w) for n, w in weights.items()}
    out = []
    for t, (lr, g) in enumerate(zip(LR, grads), start=1):
        for n, w in weights.items():
            m[n] = beta1 * m[n] + (1 - beta1) * g[n]
            v[n] = beta2 * v[n] + (1 - beta2) * g[n] ** 2
            r = (m[n] / (1 - beta1 ** t)) / (np.sqrt(v[n] / (1 - beta2 ** t)) + eps)
            update = r + (WD * w if n in DECAYED else 0)
            w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(update)
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 and n in DECAYED else 1.0
            weights[n] = w - lr * ratio * update
        out.append({n: w.copy() for n, w in weights.items()})
    return out


REFERENCES = {
    "momentum": ({}, lambda: _torch(lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9))),
    "nesterov": ({}, lambda: _torch(lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True))),
    "sgd": ({"momentum": 0.8}, lambda: _torch(lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.8))),
    "rmsprop": ({"eps": 0.0316}, lambda: _torch(lambda g: torch.optim.RMSprop(g, lr=0.1, alpha=0.9, eps=0.0316,
                                                                                momentum=0.9))),
    "rmsproptf": ({"eps": 1e-3}, lambda: _rmsprop_tf(0.9, 0.9, 1e-3)),
    "adam": ({"beta2": 0.99}, lambda: _torch(lambda g: torch.optim.Adam(g, lr=0.1, betas=(0.9, 0.99), eps=1e-8))),
    "adamw": ({}, lambda: _torch(lambda g: torch.optim.AdamW(g, lr=0.1, betas=(0.9, 0.999), eps=1e-8))),
    "lamb": ({}, lambda: _lamb(0.9, 0.999, 1e-6)),
}


@pytest.mark.parametrize("path", ["cpu kernel", "mindspore ops"])
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_first_three_updates_equal_the_reference(opt, path, graph_mode, monkeypatch):
    """Both ways the own Cells run: the C++ pass on CPU, and MindSpore's ops (GPU/Ascend, CLS_CPU_KERNELS=mindspore)."""
    if path == "mindspore ops":
        monkeypatch.setenv("CLS_CPU_KERNELS", "mindspore")
    else:
        monkeypatch.delenv("CLS_CPU_KERNELS", raising=False)
    keys, reference = REFERENCES[opt]
    ours, theirs = _ours(opt, **keys), reference()
    for step, (mine, ref) in enumerate(zip(ours, theirs), start=1):
        for name in SHAPES:
            np.testing.assert_allclose(mine[name], ref[name], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{opt}: {name} after update {step}")


def test_the_reference_sees_weight_decay_and_its_filter(graph_mode):
    """The comparison can fail: decay on every parameter (filter_bias_and_bn False) moves BatchNorm's gamma and the
    bias away from the filtered reference, and leaves the decayed weights where they were."""
    ours, ref = _ours("adamw", filter_bias_and_bn=False)[-1], REFERENCES["adamw"][1]()[-1]
    np.testing.assert_allclose(ours["conv.weight"], ref["conv.weight"], rtol=1e-5, atol=1e-5)
    for name in ("bn.gamma", "fc.bias"):
        assert not np.allclose(ours[name], ref[name], rtol=1e-5, atol=1e-5), name
    undecayed = _torch(lambda g: torch.optim.AdamW(g, lr=0.1), decoupled_wd=0.0)[-1]
    assert not np.allclose(ref["conv.weight"], undecayed["conv.weight"], rtol=1e-5, atol=1e-5)


def test_every_optimizer_has_a_reference():
    assert set(REFERENCES) == set(OPTIMIZERS)


def _torch_lrs(make_scheduler, steps: int, per_epoch: int | None = None) -> list[float]:
    """torch's LR at each optimizer step, the scheduler stepped once per epoch of `per_epoch` steps (or per step)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for i in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if per_epoch is None or (i + 1) % per_epoch == 0:
            scheduler.step()
    return lrs


EPOCHS, STEPS = 12, 5
S = torch.optim.lr_scheduler


@pytest.mark.parametrize("mode, keys, make", [
    ("step", {"step_size": 2, "gamma": 0.973}, lambda o: S.StepLR(o, step_size=2, gamma=0.973)),
    ("step", {"step_size": 3, "gamma": 0.5}, lambda o: S.StepLR(o, step_size=3, gamma=0.5)),
    ("multistep", {"milestones": (3, 7, 10), "gamma": 0.1}, lambda o: S.MultiStepLR(o, [3, 7, 10], gamma=0.1)),
    ("exponential", {"gamma": 0.8}, lambda o: S.ExponentialLR(o, gamma=0.8)),
])
def test_decays_per_epoch_equal_torch(mode, keys, make):
    ours = build_lr_schedule(mode, 0.0, 0.5, 0.0, 0, EPOCHS, STEPS, **keys)
    np.testing.assert_allclose(ours, _torch_lrs(make, EPOCHS * STEPS, per_epoch=STEPS), rtol=1e-6)


def test_per_step_decay_uses_the_fractional_epoch():
    """lr_step_per_epoch False: exponential decays smoothly, gamma per epoch = gamma ** (1/steps) per step, which is
    torch's ExponentialLR stepped every step with that gamma; step decays every step_size * steps (timm's 2.4)."""
    ours = build_lr_schedule("exponential", 0.0, 0.5, 0.0, 0, EPOCHS, STEPS, gamma=0.8, step_per_epoch=False)
    theirs = _torch_lrs(lambda o: S.ExponentialLR(o, gamma=0.8 ** (1 / STEPS)), EPOCHS * STEPS)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    timm = build_lr_schedule("step", 0.0, 0.5, 0.0, 0, 10, 10, step_size=2.4, gamma=0.973, step_per_epoch=False)
    assert timm[23] == pytest.approx(0.5) and timm[24] == pytest.approx(0.5 * 0.973)
    assert timm[47] == pytest.approx(0.5 * 0.973) and timm[48] == pytest.approx(0.5 * 0.973 ** 2)
    by_epoch = build_lr_schedule("step", 0.0, 0.5, 0.0, 0, 10, 10, step_size=2.4, gamma=0.973)
    assert by_epoch[29] == pytest.approx(0.5) and by_epoch[30] == pytest.approx(0.5 * 0.973)  # epoch 3 // 2.4 = 1


def test_cosine_restarts_equal_torch_warm_restarts():
    cycles, steps = 3, EPOCHS * STEPS
    ours = build_lr_schedule("cosine", 0.0, 0.5, 0.01, 0, EPOCHS, STEPS, num_cycles=cycles)
    theirs = _torch_lrs(lambda o: S.CosineAnnealingWarmRestarts(o, T_0=steps // cycles, eta_min=0.01), steps)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    decayed = build_lr_schedule("cosine", 0.0, 0.5, 0.0, 0, EPOCHS, STEPS, num_cycles=cycles, cycle_decay=0.5)
    assert [decayed[k * steps // cycles] for k in range(cycles)] == pytest.approx([0.5, 0.25, 0.125])
    assert list(build_lr_schedule("cosine", 0.0, 0.5, 0.01, 0, EPOCHS, STEPS, num_cycles=1)) == \
        list(build_lr_schedule("cosine", 0.0, 0.5, 0.01, 0, EPOCHS, STEPS))


def test_warmup_then_step_decay_as_torchvision_sequential_lr():
    """torchvision's references: LinearLR warmup for warmup_epochs, then the main scheduler from its start."""
    warm = 2
    ours = build_lr_schedule("step", 0.05, 0.5, 0.0, warm, EPOCHS, STEPS, step_size=2, gamma=0.5)
    theirs = _torch_lrs(lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=0.1, total_iters=warm * STEPS),
                                                     S.StepLR(o, step_size=2 * STEPS, gamma=0.5)],
                                                 milestones=[warm * STEPS]), EPOCHS * STEPS)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_a_config_rebuilds_the_same_multistep_curve_after_warmup():
    """A resumed run rebuilds the array from the same keys (and its optimizer indexes it from the saved global step,
    test_trainer.py): the config gives the same array each time, decays counted after the warmup epoch."""
    cfg = Config(lr_decay_mode="multistep", lr_milestones="3,7", lr_gamma=0.3, warmup_epochs=1, epoch_size=EPOCHS)
    first, again = schedule_of(cfg, STEPS), schedule_of(cfg.replace(), STEPS)
    assert np.array_equal(first, again) and len(first) == EPOCHS * STEPS
    assert first[STEPS * 4 - 1] == pytest.approx(cfg.lr_max) and first[STEPS * 4] == pytest.approx(cfg.lr_max * 0.3)
    assert math.isclose(first[-1], cfg.lr_max * 0.09, rel_tol=1e-6)


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_every_optimizer_state_is_recognised_as_optimizer_state(opt):
    """Fine-tuning from a periodic checkpoint of any optimizer leaves its state out (checkpoint.OPTIMIZER_NAMES) and
    a resume finds it: every parameter the optimizer adds is an optimizer entry, none is a net weight."""
    from src.engine.checkpoint import OPTIMIZER_NAMES

    params = [Parameter(Tensor(np.zeros(shape, np.float32)), name=name) for name, shape in SHAPES.items()]
    optimizer = create_optimizer(params, LR, Config(opt=opt))
    state = [p.name for p in optimizer.get_parameters() if p.name not in SHAPES]
    assert len(state) >= len(SHAPES) + 1 and "global_step" in state
    assert [name for name in state if not OPTIMIZER_NAMES.fullmatch(name)] == []


def test_a_resume_compares_the_optimizer_that_runs():
    """momentum or sgd with --nesterov True run nn.SGD(nesterov=True), whose state is not nn.Momentum's: resuming a
    momentum checkpoint with it is refused, a nesterov one is not; sgd and momentum keep different states too."""
    from pathlib import Path

    from src.engine.checkpoint import CheckpointMeta
    from src.engine.weights import check_same_schedule
    from src.errors import UserError

    def check(have: str, **keys):
        meta = CheckpointMeta(batch_size=32, opt=have)
        check_same_schedule(meta, Config(**keys), Path("m-1_3.ckpt"))

    check("nesterov", opt="momentum", nesterov=True)
    check("nesterov", opt="sgd", nesterov=True)
    for have, keys in (("momentum", {"nesterov": True}), ("momentum", {"opt": "sgd"}),
                       ("rmsprop", {"opt": "rmsproptf"})):
        with pytest.raises(UserError, match=f"was trained with --opt {have} but this run has "):
            check(have, **keys)
