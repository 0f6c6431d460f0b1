"""tinyddpm's UNet against diffusers' UNet2DModel at the same architecture, parameter count and size.

Measures, in ONE run with the two models interleaved (A B A B ...) so that machine noise hits both:
  (a) training throughput: forward + backward + AdamW step, images/s;
  (b) DDIM-50 sampling time (the same tinyddpm DDIM step drives both networks, so only the network
      differs; the two samplers advance in lockstep, A B A B at every step);
  (c) peak memory of a training step (CPU: RSS high-water mark minus RSS before the step, in a fresh
      subprocess per model; CUDA: torch.cuda.max_memory_allocated minus the memory before the step).
Ratios are reported as medians of the per-round ratios. On CUDA, ``--bf16`` (autocast) and ``--compile``
(torch.compile) apply to both models, and model FLOP utilisation is computed from
torch.utils.flop_counter's count of one training step.

    python benchmarks/bench_unet.py --preset digits-tiny
    python benchmarks/bench_unet.py --preset cifar10-small --batch 32 --sample-batch 8
    python benchmarks/bench_unet.py --preset cifar10-small --device cuda --bf16 --compile   # GPU

Needs the ``bench`` extra (diffusers, psutil): ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import tinyddpm as td

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; pass --peak-tflops for any other device.
PEAK_BF16_TFLOPS = {
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "4090": 165.0,
}


def diffusers_twin(config: dict):
    """diffusers' UNet2DModel with the same layout as ``td.UNet(**config)``: per-level channels, ResBlocks
    per level (+1 on the way up), attention at the same levels and in the middle, GroupNorm groups, time
    injection (additive or scale-shift), a 4×base time-embedding MLP, and a class embedding with the null label."""
    from diffusers import UNet2DModel

    c = td.UNet(**config).config                      # fills defaults, validates
    chans = [c["base_channels"] * m for m in c["channel_mults"]]
    attn = set(c["attention_levels"])
    if c["num_heads"] != 1 and len({chans[i] for i in attn} | {chans[-1]}) > 1:
        print("note: num_heads > 1 with different attention widths is matched only approximately in diffusers")
    return UNet2DModel(
        sample_size=c["image_size"], in_channels=c["in_channels"], out_channels=c["out_channels"],
        block_out_channels=tuple(chans), layers_per_block=c["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(chans))),
        up_block_types=tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(len(chans)))),
        norm_num_groups=c["groups"], dropout=c["dropout"],
        attention_head_dim=None if c["num_heads"] == 1 else chans[-1] // c["num_heads"],
        resnet_time_scale_shift="scale_shift" if c["time_injection"] == "scale_shift" else "default",
        flip_sin_to_cos=False, freq_shift=1,
        num_class_embeds=None if c["num_classes"] is None else c["num_classes"] + 1,
    )


def build(which: str, config: dict, device: torch.device, compile_: bool):
    torch.manual_seed(0)
    if which == "tinyddpm":
        m = td.UNet(**config).to(device)
        fn = m
    else:
        m = diffusers_twin(config).to(device)
        fn = lambda x, t: m(x, t).sample  # noqa: E731   (diffusers returns an output object)
    if compile_:
        fn = torch.compile(fn)
    return m, fn


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(model, fn, device, bf16: bool, batch: int, config: dict):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device).manual_seed(0)
    s = td.NoiseSchedule.linear(1000)
    size = config["image_size"]
    x0 = torch.randn(batch, config["in_channels"], size, size, device=device, generator=g)

    def step():
        with autocast(device, bf16):
            loss = td.diffusion_loss(fn, s, x0, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(f, n: int, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fa, fb, rounds: int, n: int, device) -> tuple[list[float], list[float]]:
    """Times of n calls of fa and of fb, alternating A B A B for ``rounds`` rounds."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(timed(fa, n, device))
        tb.append(timed(fb, n, device))
    return ta, tb


def train_flops(fn, model, device, bf16: bool, batch: int, config: dict) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, config["in_channels"], config["image_size"], config["image_size"], device=device)
    t = torch.randint(1, 1001, (batch,), device=device)
    with FlopCounterMode(display=False) as fc, autocast(device, bf16):
        fn(x, t).float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def conv_share(step, n: int = 5) -> float:
    """Fraction of a training step's CPU time (torch.profiler, self time over ``n`` steps) spent in
    convolution kernels, forward and backward: the part that is identical in both networks."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(n):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    return conv / total


def _rss_high_water() -> int:
    """Peak resident memory of this process in bytes: Linux's VmHWM (per address space, so not
    inherited from the parent across fork/exec, unlike ru_maxrss), else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def memory_child(which: str, config: dict, batch: int, device: str, bf16: bool) -> float:
    """Peak extra memory (MiB) of two training steps of a freshly built model (after the model exists)."""
    import psutil
    dev = torch.device(device)
    model, fn = build(which, config, dev, False)
    step = make_train_step(model, fn, dev, bf16, batch, config)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        step()
        sync(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    try:                                     # Linux: reset the high-water mark to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = psutil.Process().memory_info().rss
    step()
    step()
    return (_rss_high_water() - base) / 2**20


def peak_memory(which: str, config: dict, batch: int, device: str, bf16: bool, threads: int | None) -> float:
    """Run ``memory_child`` in a fresh interpreter: the RSS high-water mark is per process."""
    args = [sys.executable, __file__, "--_memory-child", which, "--_config", json.dumps(config),
            "--batch", str(batch), "--device", device] + (["--bf16"] if bf16 else []) \
        + (["--threads", str(threads)] if threads else [])
    # A fixed mmap threshold stops glibc from keeping freed tensors in the heap, so RSS tracks the live
    # memory instead of the allocator's history (without it, repeated runs differed by ~50%).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    unets = [k for k, (kind, _) in td.PRESETS.items() if kind == "unet"]
    p.add_argument("--preset", default="digits-tiny", choices=unets)
    p.add_argument("--batch", type=int, default=128, help="training batch size")
    p.add_argument("--sample-batch", type=int, default=16, help="DDIM sampling batch size")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5, help="A B rounds per measurement (medians are reported)")
    p.add_argument("--steps", type=int, default=3, help="training steps timed per round and model")
    p.add_argument("--sample-rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both models (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the measurements to PATH as JSON")
    p.add_argument("--_memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_config", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a._memory_child:
        print(memory_child(a._memory_child, json.loads(a._config), a.batch, a.device, a.bf16))
        return

    device = torch.device(a.device)
    _, config = td.preset(a.preset, dropout=0.0)           # dropout off: identical work in both models
    ours, f_ours = build("tinyddpm", config, device, a.compile)
    theirs, f_theirs = build("diffusers", config, device, a.compile)
    n_ours, n_theirs = td.count_parameters(ours), td.count_parameters(theirs)
    import diffusers
    print(f"preset {a.preset}: {json.dumps(config)}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, device {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"threads {torch.get_num_threads()}, "
          f"bf16 {a.bf16}, compile {a.compile}")
    print(f"parameters: tinyddpm {n_ours:,}  diffusers {n_theirs:,}  (diff {100 * (n_ours / n_theirs - 1):+.2f}%)")
    results: dict = {"preset": a.preset, "device": str(device), "bf16": a.bf16, "compile": a.compile,
                     "batch": a.batch, "params": {"tinyddpm": n_ours, "diffusers": n_theirs},
                     "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}

    # (a) training throughput
    step_ours = make_train_step(ours, f_ours, device, a.bf16, a.batch, config)
    step_theirs = make_train_step(theirs, f_theirs, device, a.bf16, a.batch, config)
    for _ in range(2 if not a.compile else 3):                                 # warm-up (and compilation)
        step_ours()
        step_theirs()
    ta, tb = interleaved(step_ours, step_theirs, a.rounds, a.steps, device)
    ips = lambda ts: statistics.median(a.batch * a.steps / t for t in ts)  # noqa: E731
    ratio = statistics.median(b / x for x, b in zip(ta, tb, strict=True))
    print(f"(a) train step, batch {a.batch}: tinyddpm {ips(ta):.1f} img/s, diffusers {ips(tb):.1f} img/s; "
          f"speed-up (median of {a.rounds} ABAB ratios) {ratio:.2f}x")
    results["train"] = {"img_s": {"tinyddpm": ips(ta), "diffusers": ips(tb)}, "speedup": ratio}
    if device.type == "cpu" and not a.compile:
        c_ours, c_theirs = conv_share(step_ours), conv_share(step_theirs)
        print(f"    share of the step in convolutions (same kernels, same FLOPs in both): tinyddpm {c_ours:.0%}, "
              f"diffusers {c_theirs:.0%}; so at most {1 / c_theirs:.2f}x even if all else in ours were free")
    flops = train_flops(ours, ours, device, a.bf16, a.batch, config)
    flops_d = train_flops(lambda x, t: theirs(x, t).sample, theirs, device, a.bf16, a.batch, config)
    per_s = flops * a.steps / statistics.median(ta)
    line = f"    model FLOPs per train step: tinyddpm {flops / 1e9:.2f} GFLOP, diffusers {flops_d / 1e9:.2f} GFLOP; " \
           f"tinyddpm achieves {per_s / 1e12:.3f} TFLOP/s"
    results["flops_per_step"] = {"tinyddpm": flops, "diffusers": flops_d}
    results["tflop_s"] = {"tinyddpm": per_s / 1e12}
    peak = a.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak:
        per_s_d = flops_d * a.steps / statistics.median(tb)
        line += f"; MFU tinyddpm {100 * per_s / (peak * 1e12):.1f}%, diffusers {100 * per_s_d / (peak * 1e12):.1f}% " \
                f"(peak {peak:g} TFLOP/s)"
        results["tflop_s"]["diffusers"] = per_s_d / 1e12
        results["mfu"] = {"tinyddpm": per_s / (peak * 1e12), "diffusers": per_s_d / (peak * 1e12), "peak_tflops": peak}
    print(line)

    # (b) DDIM-50 sampling: the two samplers run in lockstep, alternating model A and B at every step,
    # so a change in machine load hits both equally; each round's times are the sums over its steps.
    if not a.no_sampling:
        s = td.NoiseSchedule.linear(1000)
        shape = (a.sample_batch, config["in_channels"], config["image_size"], config["image_size"])
        ts = td.ddim_timesteps(s.T, a.ddim_steps, "trailing")
        ours.eval()
        theirs.eval()

        def lockstep() -> tuple[float, float]:
            x_T = torch.randn(shape, generator=torch.Generator(device).manual_seed(1), device=device)
            xs, took = [x_T, x_T.clone()], [0.0, 0.0]
            for t, t_prev in zip(ts, ts[1:] + [0], strict=True):
                tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
                for i, fn in enumerate((f_ours, f_theirs)):
                    sync(device)
                    t0 = time.perf_counter()
                    with torch.no_grad(), autocast(device, a.bf16):
                        eps = fn(xs[i], tt).float()
                    xs[i] = td.ddim_step(s, xs[i], tt, torch.full_like(tt, t_prev), eps)
                    sync(device)
                    took[i] += time.perf_counter() - t0
            return took[0], took[1]
        lockstep()                                                             # warm-up
        rounds = [lockstep() for _ in range(a.sample_rounds)]
        ta, tb = [r[0] for r in rounds], [r[1] for r in rounds]
        ratio = statistics.median(b / x for x, b in zip(ta, tb, strict=True))
        print(f"(b) DDIM-{a.ddim_steps} sampling, batch {a.sample_batch}: tinyddpm {statistics.median(ta):.2f} s, "
              f"diffusers {statistics.median(tb):.2f} s; "
              f"speed-up (median of {a.sample_rounds} lockstep rounds) {ratio:.2f}x")
        results["ddim"] = {"steps": a.ddim_steps, "batch": a.sample_batch, "seconds": {
            "tinyddpm": statistics.median(ta), "diffusers": statistics.median(tb)}, "speedup": ratio}
        ours.train()
        theirs.train()

    # (c) peak memory of a training step, each model in its own process
    if not a.no_memory:
        mo = peak_memory("tinyddpm", config, a.batch, a.device, a.bf16, a.threads)
        md = peak_memory("diffusers", config, a.batch, a.device, a.bf16, a.threads)
        kind = "max_memory_allocated" if device.type == "cuda" else "RSS high-water mark"
        print(f"(c) peak extra memory of a train step ({kind}), batch {a.batch}: tinyddpm {mo:.1f} MiB, "
              f"diffusers {md:.1f} MiB; ratio diffusers/tinyddpm {md / mo:.2f}")
        results["peak_memory_mib"] = {"kind": kind, "tinyddpm": mo, "diffusers": md}
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
