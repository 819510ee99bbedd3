"""CPU environment settings: the oneDNN ISA cap (and that it keeps the numerics), OpenMP waiting, import order."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
from conftest import ROOT

from src import device


def test_cpu_setting_applied_once_and_overridable(monkeypatch):
    monkeypatch.setattr(device, "_cpu_has_avx512", lambda: True)
    monkeypatch.delenv(device.ISA_VAR, raising=False)
    note = device.prepare_cpu_environment()
    assert note and "ONEDNN_MAX_CPU_ISA=AVX2" in note
    assert device.os.environ[device.ISA_VAR] == "AVX2"
    assert device.prepare_cpu_environment() is None  # already set: nothing changes, nothing logged again
    monkeypatch.setenv(device.ISA_VAR, "AVX512_CORE")
    assert device.prepare_cpu_environment() is None and device.os.environ[device.ISA_VAR] == "AVX512_CORE"


def test_cpu_setting_not_applied_without_avx512(monkeypatch):
    monkeypatch.setattr(device, "_cpu_has_avx512", lambda: False)
    monkeypatch.delenv(device.ISA_VAR, raising=False)
    assert device.prepare_cpu_environment() is None and device.ISA_VAR not in device.os.environ



def test_openmp_threads_wait_passively_on_cpu(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    device.prepare_cpu_threads("GPU")
    assert "OMP_WAIT_POLICY" not in device.os.environ
    device.prepare_cpu_threads("CPU")
    assert device.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    device.prepare_cpu_threads("CPU")
    assert device.os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice stays


def test_entry_scripts_set_the_cpu_environment_before_mindspore_loads():
    # libgomp reads OMP_WAIT_POLICY when MindSpore loads it: the scripts must not import mindspore at module level
    code = "import sys; import train, eval, benchmark; print('mindspore' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]

ISA_PROBE = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from src.device import prepare_cpu_environment
prepare_cpu_environment()
import mindspore as ms
from mindspore import nn
from src.models import create_model
ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
ms.set_seed(0)
net = create_model("mobilenetv2", 10, width=0.35)
rng = np.random.default_rng(0)
x = ms.Tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
y = ms.Tensor(np.arange(4, dtype=np.int32))
net.set_train(False)
loss, grads = ms.value_and_grad(nn.WithLossCell(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")),
                                None, net.trainable_params())(x, y)
np.savez(sys.argv[1], logits=net(x).asnumpy(), loss=loss.asnumpy(), *[g.asnumpy() for g in grads])
"""


def test_cpu_isa_setting_keeps_the_numerics(tmp_path):
    # The AVX2 cap changes which oneDNN kernels run, not what they compute: logits, loss and every gradient agree
    # within float32 noise between no cap (ALL: what an AVX-512 CPU runs uncapped), AVX2 (the cap) and SSE41 (a
    # different kernel family on every x86 CPU). BatchNorm uses its moving statistics so the gradients measure
    # the convolution kernels (batch statistics of 4 images amplify rounding ~1e4x; measured 5e-8 relative here).
    script = tmp_path / "probe.py"
    script.write_text(ISA_PROBE)
    results = {}
    for isa in ("ALL", "AVX2", "SSE41"):
        out = tmp_path / f"{isa}.npz"
        env = dict(device.os.environ, ONEDNN_MAX_CPU_ISA=isa, GLOG_v="3")
        proc = subprocess.run([sys.executable, str(script), str(out), str(ROOT)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[isa] = np.load(out)
    ref = results["AVX2"]
    grads = [key for key in ref.files if key.startswith("arr_")]
    assert len(grads) > 100  # every trainable parameter of the net
    scale = max(float(np.abs(ref[key]).max()) for key in grads)
    assert scale > 0
    for isa in ("ALL", "SSE41"):
        np.testing.assert_allclose(results[isa]["logits"], ref["logits"], rtol=1e-4, atol=1e-5, err_msg=isa)
        np.testing.assert_allclose(results[isa]["loss"], ref["loss"], rtol=1e-5, err_msg=isa)
        for key in grads:
            np.testing.assert_allclose(results[isa][key], ref[key], rtol=1e-4, atol=1e-5 * scale,
                                       err_msg=f"{isa} gradient {key}")
