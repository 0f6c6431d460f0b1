"""Measure how exactly tinyddpm.interop converts UNets to and from diffusers' UNet2DModel.

For each layout: a random-weight diffusers model (every GroupNorm scale and every bias perturbed, so
each tensor matters) is converted to tinyddpm and back; a random tinyddpm model (time_shift 0, as
trained here) is exported. Prints the max |m(x, t) - unet(x, t - 1).sample| over t in {1, 37, 500,
1000}, the parameter counts, and the end-to-end DDIM-10 difference against diffusers' DDIMScheduler.

    python benchmarks/convert_check.py            # ~1 minute on one CPU thread
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DDIMScheduler, UNet2DModel

import tinyddpm as td
from tinyddpm.interop import from_diffusers, to_diffusers

LAYOUTS = {
    "google/ddpm-cifar10-32 (35.7 M)": dict(
        sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), downsample_padding=0,
        freq_shift=1, flip_sin_to_cos=False, norm_eps=1e-6, attention_head_dim=None),
    "scale_shift, mid attn w/o norm, 16², 1 ch": dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"), norm_num_groups=8,
        resnet_time_scale_shift="scale_shift", attention_head_dim=8),
    "28², 3 levels, attn at 7², 2 blocks, 1 ch": dict(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(16, 32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=None),
    "32², attn at 3 levels, head_dim 8, flip": dict(
        sample_size=32, block_out_channels=(16, 32, 48, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), flip_sin_to_cos=True,
        freq_shift=0, downsample_padding=0),
    "diffusers defaults at 32², no mid attn": dict(
        sample_size=32, block_out_channels=(32, 64, 96, 128), norm_num_groups=16, add_attention=False),
}


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


@torch.no_grad()
def err(m: td.UNet, u: UNet2DModel, size: int, ch: int) -> tuple[float, float]:
    x = torch.randn(4, ch, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 37, 500, 1000])
    ref = u(x, t - 1).sample
    return (m(x, t) - ref).abs().max().item(), ref.abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'layout':44s} {'params':>11s} {'d→td':>9s} {'td→d→td':>9s} {'td→d':>9s} {'|out|max':>8s}")
    for name, cfg in LAYOUTS.items():
        torch.manual_seed(0)
        u = perturb(UNet2DModel(**cfg), 1)
        m = from_diffusers(u)
        n = td.count_parameters(m)
        assert n == sum(p.numel() for p in u.parameters())
        ch = cfg.get("in_channels", 3)
        e_in, scale = err(m, u, cfg["sample_size"], ch)
        e_back, _ = err(m, to_diffusers(m), cfg["sample_size"], ch)
        kw = dict(m.config, time_shift=0)                     # the same network trained here: t embedded as is
        torch.manual_seed(0)
        ours = perturb(td.UNet(**kw), 2)
        e_out, _ = err(ours, to_diffusers(ours), cfg["sample_size"], ch)
        print(f"{name:44s} {n:11,d} {e_in:9.1e} {e_back:9.1e} {e_out:9.1e} {scale:8.2f}")

    torch.manual_seed(0)
    m = perturb(td.UNet(image_size=8, base_channels=16, groups=4), 5)
    s, steps = td.NoiseSchedule.linear(1000), 10
    u = to_diffusers(m)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = td.ddim_sample(m, s, (2, 1, 8, 8), steps=steps, eta=0.0, spacing="trailing", x_T=x_T)
    sched = DDIMScheduler(num_train_timesteps=1000, trained_betas=s.betas[1:].tolist(), clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for i in sched.timesteps:
            x = sched.step(u(x, i).sample, i, x, eta=0.0).prev_sample
    print(f"DDIM-10 (trailing, η=0): max |x0(diffusers DDIMScheduler) - x0(td.ddim_sample)| = "
          f"{(x - ours).abs().max().item():.1e} (|x0| max {ours.abs().max().item():.2f})")


if __name__ == "__main__":
    main()
