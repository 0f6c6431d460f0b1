"""bf16 autocast training on a CPU against float32: step time, side by side in one run.

For each preset, two copies of the same network (same initial weights, same batches) train with
AdamW on the ε-prediction loss: one in float32, one under ``torch.autocast("cpu", torch.bfloat16)``.
Rounds alternate A B A B so that a change in machine load hits both; the report is the median of the
per-round time ratios. Whether the CPU has native bf16 (AVX-512 BF16 / AMX) decides the outcome:
without it oneDNN converts to and from float32 around each kernel.

    python benchmarks/cpu_bf16.py                       # digits-tiny (base 16, no attention) and cifar10-small
    python benchmarks/cpu_bf16.py --rounds 7 --threads 2 --quality 300   # + loss after equal steps
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch

import tinyddpm as td

PRESETS = {
    "digits-tiny": dict(base_channels=16, attention_levels=()),
    "cifar10-small": {},
}


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(next(l for l in f if l.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f"{k}: {'yes' if k in flags else 'no'}" for k in ("avx512f", "avx512_bf16", "amx_bf16"))


def make_step(model: torch.nn.Module, bf16: bool, batch: int, s: td.NoiseSchedule, seed: int):
    """One training step on fresh (seeded) draws; returns the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=True)
    c, h = model.config["in_channels"], model.config["image_size"]
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(256, c, h, h, generator=g) * 2 - 1           # a fixed pool of "images"

    def step() -> float:
        idx = torch.randint(len(x0), (batch,), generator=g)
        t = torch.randint(1, s.T + 1, (batch,), generator=g)
        eps = torch.randn((batch, c, h, h), generator=g)
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with amp:
            loss = td.diffusion_loss_at(model, s, x0[idx], t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def measure(name: str, overrides: dict, a) -> dict:
    kind, cfg = td.preset(name, dropout=0.0, **overrides)
    torch.manual_seed(0)
    fp32 = td.build_model(kind, cfg)
    bf16 = copy.deepcopy(fp32)
    s = td.NoiseSchedule.linear(1000)
    batch = a.batch or (128 if name == "digits-tiny" else 16)
    steps = {False: make_step(fp32, False, batch, s, 1), True: make_step(bf16, True, batch, s, 1)}
    for _ in range(2):                                            # warm-up (oneDNN primitive caches)
        steps[False](), steps[True]()
    times = {False: [], True: []}
    for r in range(a.rounds):
        for flag in ((False, True) if r % 2 == 0 else (True, False)):   # ABBA: neither always goes first
            t0 = time.perf_counter()
            for _ in range(a.steps):
                steps[flag]()
            times[flag].append((time.perf_counter() - t0) / a.steps)
    ratios = [b / f for f, b in zip(times[False], times[True], strict=True)]
    out = {"preset": name, "overrides": overrides, "params": td.count_parameters(fp32), "batch": batch,
           "fp32_s": statistics.median(times[False]), "bf16_s": statistics.median(times[True]),
           "ratio": statistics.median(ratios), "ratios": ratios}
    if a.quality:                                                 # loss after equal steps (same draws)
        losses = {}
        for flag in (False, True):
            hist = [steps[flag]() for _ in range(a.quality)]
            losses[flag] = statistics.mean(hist[-min(50, len(hist)):])
        out["loss_fp32"], out["loss_bf16"] = losses[False], losses[True]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median ratio is reported)")
    p.add_argument("--steps", type=int, default=3, help="training steps per round and precision")
    p.add_argument("--batch", type=int, default=None, help="default: 128 (digits-tiny), 16 (cifar10-small)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quality", type=int, default=0, help="then train N more steps each; report the final loss")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); CPU {cpu_flags()}; "
          f"{a.rounds} ABBA rounds of {a.steps} steps")
    for name in a.presets:
        r = measure(name, PRESETS[name], a)
        line = (f"{name} {r['overrides'] or ''} ({r['params']:,} params, batch {r['batch']}): fp32 "
                f"{1000 * r['fp32_s']:.0f} ms/step, bf16 autocast {1000 * r['bf16_s']:.0f} ms/step; "
                f"bf16/fp32 time {r['ratio']:.2f}x (rounds: {', '.join(f'{x:.2f}' for x in r['ratios'])})")
        if a.quality:
            line += f"; mean loss of the last 50 of {a.quality} more steps: fp32 {r['loss_fp32']:.4f}, " \
                    f"bf16 {r['loss_bf16']:.4f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
