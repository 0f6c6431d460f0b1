"""Multi-process training (PyTorch DDP, gloo on CPU) under torchrun matches one process.

Every rank draws the same global batch and trains on its slice; DDP averages the gradients, so two
processes with batch_size B take the same optimiser steps as one process with batch_size B, up to
float round-off in the order of summation — here with each rank also splitting its half into two
micro-batches (``accum_steps=2``, gradients synchronised only after the second, via ``no_sync``).
The ranks are forked from the test process with the
environment torchrun would set (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tinyddpm.data.datasets import load_dataset
from tinyddpm.nets.presets import build_model
from tinyddpm.training.config import DiffusionConfig, TrainConfig
from tinyddpm.training.trainer import Trainer


def run(out: str, ckpt_dir: str | None = None, accum_steps: int = 1) -> None:
    """Train a tiny conditional MLP for 8 steps and save its weights and losses to ``out``."""
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(rank)  # each rank starts from DIFFERENT weights: DDP must broadcast rank 0's
    model = build_model("mlp", dict(dim=2, hidden=32, depth=2, time_dim=16, num_classes=8))
    d = DiffusionConfig(T=50)
    cfg = TrainConfig(steps=8, batch_size=16, lr=3e-3, warmup_steps=2, device="cpu", progress=False,
                      ema_decay=0.9, label_dropout=0.2, log_every=4, ckpt_every=0, accum_steps=accum_steps)
    tr = Trainer(model, d.build(), load_dataset("mixture", n=256), cfg, ckpt_dir, d)
    hist = tr.train()
    torch.save({"model": tr.model.state_dict(), "ema": tr.ema_model.state_dict(),
                "losses": [r["loss"] for r in hist], "world": tr.dist.world_size,
                "local_batch": tr.next_batch()["idx"].shape[0],
                "broadcast_buffers": getattr(tr._net, "broadcast_buffers", None)}, out)
    if dist.is_initialized():
        dist.destroy_process_group()


def _rank_main(rank: int, world: int, port: int, out_dir: str, ckpt_dir: str) -> None:
    # what torchrun sets for each process; Trainer joins the group from these variables
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run(f"{out_dir}/rank{rank}.pt", ckpt_dir, accum_steps=2)  # each rank: two micro-batches of 4 (no_sync on the 1st)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.skipif(sys.platform != "linux", reason="forks the test process (fast: torch is already imported)")
def test_two_processes_match_one(tmp_path, monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(str(tmp_path / "single.pt"))
    finally:
        torch.set_num_threads(n)
    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path), str(tmp_path / "run")), nprocs=2,
                       start_method="fork")
    one = torch.load(tmp_path / "single.pt", weights_only=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert one["world"] == 1 and r0["world"] == r1["world"] == 2
    assert one["local_batch"] == 16 and r0["local_batch"] == r1["local_batch"] == 8  # each rank: half the batch
    assert r0["broadcast_buffers"] is False  # no per-forward buffer broadcast (the nets have no running stats)
    for key in ("model", "ema"):
        for name in one[key]:
            assert torch.equal(r0[key][name], r1[key][name]), f"ranks disagree on {key}.{name}"
            # same global batches: equal to one process up to summation-order round-off
            torch.testing.assert_close(r0[key][name], one[key][name], rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    assert r0["losses"] == r1["losses"]  # the logged loss is the all-reduced mean
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    # only rank 0 wrote the run directory
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["latest", "log.jsonl", "step_000008"]
