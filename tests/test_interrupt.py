"""A training run never loses its work: SIGINT/SIGTERM checkpoint and exit 130/143, SIGKILL leaves the
last checkpoint loadable, and the default policy saves periodically (every 10 % of the run, or by the clock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tinyddpm.data.datasets import load_dataset
from tinyddpm.nets.presets import build_model
from tinyddpm.training.checkpoint import list_checkpoints, load_checkpoint
from tinyddpm.training.config import DiffusionConfig, TrainConfig
from tinyddpm.training.trainer import Trainer, TrainingInterrupted

DIFF = DiffusionConfig(T=50)
CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from tinyddpm.data.datasets import load_dataset
    from tinyddpm.nets.presets import build_model
    from tinyddpm.training.config import DiffusionConfig, TrainConfig
    from tinyddpm.training.trainer import Trainer, TrainingInterrupted
    out, ckpt_every = sys.argv[1], int(sys.argv[2])
    d = DiffusionConfig(T=50)
    torch.manual_seed(0)
    model = build_model("mlp", dict(dim=2, hidden=32, depth=2, time_dim=16))
    cfg = TrainConfig(steps=10**7, batch_size=16, lr=1e-3, warmup_steps=0, device="cpu", progress=False,
                      log_every=0, ckpt_every=ckpt_every, ckpt_minutes=0, keep_last=2, ema_decay=0.9)
    tr = Trainer(model, d.build(), load_dataset("mixture", n=256, seed=0), cfg, out, d)
    try:
        tr.train()
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
""")


def config(steps: int, **kw) -> TrainConfig:
    base = dict(steps=steps, batch_size=16, lr=1e-3, warmup_steps=0, device="cpu", progress=False, log_every=0,
                ckpt_every=0, ckpt_minutes=0, keep_last=2, ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


def start(out: Path, ckpt_every: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(ckpt_every)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoints(proc: subprocess.Popen, out: Path, n: int = 1, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(list_checkpoints(out)) < n or not (out / "latest").is_file():
        if proc.poll() is not None:
            raise AssertionError(f"the training process ended early: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint appeared in time")
        time.sleep(0.05)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_checkpoints_exits_130_and_resumes_bit_exactly(tmp_path):
    out = tmp_path / "run"
    proc = start(out, ckpt_every=25)
    wait_for_checkpoints(proc, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("SIGINT received: stopped after step ")
    k = int(lines[0].split("stopped after step ")[1].split(";")[0])
    assert f"step_{k:06d}" in lines[0] and f"tinyddpm train --out {out} --resume" in lines[0]
    assert load_checkpoint(out).step == k                         # the interrupt wrote the step it stopped at
    # resume to k + 3 (constant lr: `steps` may change) == a straight run of k + 3 steps, bit for bit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_dataset("mixture", n=256, seed=0)
        resumed = Trainer.resume(out, data, steps=k + 3)
        assert resumed.step == k
        resumed.train()
        torch.manual_seed(0)
        model = build_model("mlp", dict(dim=2, hidden=32, depth=2, time_dim=16))
        straight = Trainer(model, DIFF.build(), data, config(k + 3), None, DIFF)
        straight.train()
    finally:
        torch.set_num_threads(threads)
    for a, b in ((resumed.model, straight.model), (resumed.ema_model, straight.ema_model)):
        wa, wb = weights(a), weights(b)
        assert all(torch.equal(wa[n], wb[n]) for n in wa)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_exits_143_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = start(out, ckpt_every=25)
    wait_for_checkpoints(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "SIGTERM received" in err, err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigkill_at_any_moment_leaves_the_last_checkpoint_loadable(tmp_path):
    out = tmp_path / "run"
    proc = start(out, ckpt_every=1)             # checkpoints back to back: the kill lands mid-write
    wait_for_checkpoints(proc, out, n=2)
    time.sleep(0.3)
    proc.kill()
    proc.communicate(timeout=60)
    ck = load_checkpoint(out)
    assert ck.step >= 2 and all(torch.isfinite(p).all() for p in ck.model.parameters())
    resumed = Trainer.resume(out, load_dataset("mixture", n=256, seed=0), steps=ck.step + 2)
    assert resumed.step == ck.step and len(resumed.train()) == 2


def test_interrupt_in_process_finishes_the_step_and_saves(tmp_path):
    """The handler only sets a flag: the step in progress completes, then checkpoint + TrainingInterrupted."""
    data = load_dataset("mixture", n=64, seed=0)
    torch.manual_seed(0)
    tr = Trainer(build_model("mlp", dict(dim=2, hidden=16, depth=1, time_dim=8)), DIFF.build(), data,
                 config(50), tmp_path, DIFF)
    calls = {"n": 0}

    def hook(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)   # arrives in the middle of step 3
        return output

    tr.model.register_forward_hook(hook)
    before = signal.getsignal(signal.SIGINT)    # Python's default; SIG_IGN in a pytest-xdist worker
    with pytest.raises(TrainingInterrupted) as info:
        tr.train()
    e = info.value
    assert e.exit_code == 130 and e.step == tr.step == 3 and e.checkpoint == tmp_path / "step_000003"
    assert load_checkpoint(tmp_path).step == 3
    assert signal.getsignal(signal.SIGINT) is before       # the handler that was there is restored


def test_default_policy_checkpoints_every_tenth_and_by_the_clock(tmp_path):
    data = load_dataset("mixture", n=64, seed=0)

    def run(out, **kw):
        torch.manual_seed(0)
        model = build_model("mlp", dict(dim=2, hidden=16, depth=1, time_dim=8))
        steps: list[int] = []
        tr = Trainer(model, DIFF.build(), data, config(20, keep_last=100, **kw), out, DIFF)
        real = tr.save
        tr.save = lambda: (steps.append(tr.step), real())[1]  # type: ignore[method-assign]
        tr.train()
        return steps

    assert run(tmp_path / "a", ckpt_every=None) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert run(tmp_path / "b", ckpt_every=0, ckpt_minutes=1e-9) == list(range(1, 21))   # the clock is always due
    assert run(tmp_path / "c", ckpt_every=0, ckpt_minutes=0) == [20]                     # only the final one
    torch.manual_seed(0)
    model = build_model("mlp", dict(dim=2, hidden=16, depth=1, time_dim=8))
    Trainer(model, DIFF.build(), data, config(5, ckpt_every=None), None, DIFF).train()   # no out_dir: no saving
