"""The device resolver: clear errors for devices that are not there, CPU by default, timers without per-step syncs."""

import pytest
import torch

from sae_ortho.base import device


def test_resolve_cpu_and_auto():
    assert device.resolve("cpu") == torch.device("cpu")
    expected = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert device.resolve("auto") == expected


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "CPU", "", "cuda:0:1"])
def test_resolve_rejects_malformed_specs(spec):
    with pytest.raises(ValueError, match="is not one of cpu, cuda, cuda:N, auto"):
        device.resolve(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_a_one_line_error(spec):
    with pytest.raises(ValueError, match="torch sees no CUDA GPU") as err:
        device.resolve(spec)
    assert "\n" not in str(err.value)


def test_lm_dtype():
    assert device.lm_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="lm_dtype: 'fp8'"):
        device.lm_dtype("fp8")


def test_record_and_host_copies():
    rec = device.record(torch.device("cpu"), torch.float16)
    assert rec["device"] == "cpu" and rec["lm_dtype"] == "float16" and rec["torch"] == torch.__version__
    t = torch.arange(4.0, requires_grad=True)
    assert device.to_numpy(t * 2).tolist() == [0.0, 2.0, 4.0, 6.0]
    assert device.to_device(t, torch.device("cpu")) is t


def test_step_timer_cpu():
    timer = device.StepTimer(torch.device("cpu"))
    for _ in range(3):
        timer.start()
        sum(range(10_000))
        timer.stop()
    seconds = timer.elapsed()
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    assert timer.elapsed() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this project's machines)")
def test_step_timer_cuda_times_the_work():
    dev = device.resolve("cuda")
    timer = device.StepTimer(dev)
    x = torch.randn(4096, 4096, device=dev)
    timer.start()
    for _ in range(20):
        x = x @ x / 4096
    timer.stop()
    assert timer.elapsed()[0] > 0
    pinned = device.to_device(torch.ones(3), dev)
    assert pinned.device == dev and pinned.sum().item() == 3


def test_no_device_literals_outside_the_resolver():
    """Every device comes from params through base/device.py (HOST names the CPU where host-side work is
    meant): a string "cpu" or "cuda..." elsewhere in the library, stages or benchmarks is a device bug."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    allowed = {root / "sae_ortho/base/device.py", root / "sae_ortho/base/params.py"}  # params: the default's text
    found = []
    for path in [*root.glob("sae_ortho/**/*.py"), *root.glob("stages/*.py"), *root.glob("bench/*.py")]:
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""
            if text == "cpu" or text.startswith("cuda"):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {text!r}")
    assert not found, "\n".join(found)
