"""Exact conversion to and from diffusers' UNet2DModel and its schedulers (tinyddpm.interop).

The reference is diffusers' own forward pass on random weights (every layer perturbed, so a weight
sent to the wrong place shows): ``m(x, t) == unet(x, t - 1).sample`` to float32 round-off, both ways.
"""

from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch

import tinyddpm as td
from tinyddpm.interop import (
    DIFFUSERS_UNET_DEFAULTS,
    export_checkpoint,
    from_diffusers,
    to_diffusers,
    unet_kwargs_from_diffusers,
)
from tinyddpm.sampling.ddpm_ddim import ddim_timesteps
from tinyddpm.training.checkpoint import load_checkpoint

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

TOL = 2e-5          # float32 round-off on outputs of size ~1 (measured ≤ 3e-6, see benchmarks/convert_check.py)
CIFAR10 = dict(     # google/ddpm-cifar10-32's config
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, freq_shift=1, flip_sin_to_cos=False, norm_eps=1e-6, attention_head_dim=None, dropout=0.0,
)
SMALL = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
LAYOUTS = {
    "scale_shift, mid attention without norm, 16×16×1": dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"), norm_num_groups=8,
        resnet_time_scale_shift="scale_shift", attention_head_dim=8),
    "scale_shift, attn_norm_num_groups set, 8×8×3": dict(
        SMALL, sample_size=8, resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4, freq_shift=1),
    "28×28×1, 3 levels, attention at 7×7, 2 blocks, diffusers' default embedding": dict(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(16, 32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=None),
    "32×32×3, attention at 3 levels, heads of 8, flip_sin_to_cos": dict(
        sample_size=32, block_out_channels=(16, 32, 48, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), flip_sin_to_cos=True,
        freq_shift=0, downsample_padding=0),
    "no mid attention, dropout (eval), eps 1e-6, 1→2 channels": dict(
        SMALL, sample_size=8, in_channels=1, out_channels=2, add_attention=False, dropout=0.1, norm_eps=1e-6),
}


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Make every parameter matter: GroupNorm scales/biases and all biases off their 1/0 init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    for name, p in module.named_parameters():
        assert p.abs().max() > 0, name
    return module.eval()


def random_diffusers(cfg: dict, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return perturb(UNet2DModel(**cfg), seed + 1)


def inputs(unet_cfg: dict, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    size, c = unet_cfg["sample_size"], unet_cfg.get("in_channels", 3)
    t = torch.tensor([1, 37, 500, 1000][:batch])             # paper-indexed: diffusers' 0, 36, 499, 999
    return torch.randn(batch, c, size, size, generator=g), t


@torch.no_grad()
def check_same(m: td.UNet, u: UNet2DModel, x: torch.Tensor, t: torch.Tensor) -> float:
    ours, theirs = m(x, t), u(x, t - 1).sample
    err = (ours - theirs).abs().max().item()
    assert err <= TOL * max(1.0, theirs.abs().max().item()), err
    return err


# ------------------------------------------------------------------ diffusers -> tinyddpm -> diffusers
def test_google_ddpm_cifar10_layout_both_ways():
    u = random_diffusers(CIFAR10)
    m = from_diffusers(u)
    n = td.count_parameters(m)
    assert n == sum(p.numel() for p in u.parameters()) == 35_746_307       # the DDPM paper's 35.7 M
    x, t = inputs(CIFAR10, batch=2)
    t = torch.tensor([1, 1000])
    check_same(m, u, x, t)
    cfg = m.config                                            # the DDPM preset, plus diffusers' layout options
    ddpm = td.UNet(**td.preset("cifar10-ddpm")[1]).config
    same = ("base_channels", "channel_mults", "num_res_blocks", "attention_levels", "groups", "time_injection")
    assert {k: cfg[k] for k in same} == {k: ddpm[k] for k in same}
    assert (cfg["downsample_padding"], cfg["norm_eps"], cfg["time_shift"]) == (0, 1e-6, -1)
    back = to_diffusers(m)
    sd, sd_back = u.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)    # time_shift = -1: no fold, the very same weights


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_both_ways(name):
    cfg = LAYOUTS[name]
    u = random_diffusers(cfg)
    m = from_diffusers(u)
    assert td.count_parameters(m) == sum(p.numel() for p in u.parameters())
    x, t = inputs(cfg)
    check_same(m, u, x, t)
    check_same(m, to_diffusers(m), x, t)
    rebuilt = td.UNet(**json.loads(json.dumps(m.config)))     # the config is plain JSON and rebuilds it
    rebuilt.load_state_dict(m.state_dict())
    check_same(rebuilt.eval(), u, x, t)


def test_attention_heads_follow_attention_head_dim():
    m = from_diffusers(random_diffusers(LAYOUTS["32×32×3, attention at 3 levels, heads of 8, flip_sin_to_cos"]))
    assert [lv.attn[0].attn.heads for lv in m.down[1:]] == [4, 6, 8] and m.mid.attn[0].attn.heads == 8


# ------------------------------------------------------------------ tinyddpm -> diffusers (trained here, time_shift 0)
@pytest.mark.parametrize("cfg", [
    dict(in_channels=1, image_size=8, base_channels=16, channel_mults=(1, 2), attention_levels=(1,), groups=4),
    dict(in_channels=3, image_size=16, base_channels=16, channel_mults=(1, 2, 2), attention_levels=(0, 2),
         num_res_blocks=2, groups=8, time_injection="add", downsample_padding=0),
    dict(in_channels=1, image_size=8, base_channels=16, channel_mults=(1, 2), attention_levels=(1,), groups=4,
         num_heads=4),
    dict(in_channels=1, image_size=8, base_channels=16, channel_mults=(1, 2), groups=4, mid_attention="none",
         head_dim=8, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-6),
    dict(in_channels=1, image_size=8, base_channels=16, channel_mults=(1, 3), groups=4, mid_attention="no_norm"),
])
def test_our_models_export_exactly(cfg):
    """A model trained here embeds t itself (time_shift 0): the export folds the shift into linear_1."""
    torch.manual_seed(0)
    m = perturb(td.UNet(**cfg), 3)
    assert m.config["time_shift"] == 0
    u = to_diffusers(m)
    assert td.count_parameters(m) == sum(p.numel() for p in u.parameters())
    x, t = inputs(dict(sample_size=cfg["image_size"], in_channels=cfg["in_channels"]))
    check_same(m, u, x, t)
    m2 = from_diffusers(u)                                    # and back: now with time_shift -1
    check_same(m2, u, x, t)
    torch.testing.assert_close(m2(x, t), m(x, t), rtol=0, atol=TOL)


def test_export_refuses_what_unet2dmodel_cannot_express():
    with pytest.raises(ValueError, match="num_classes=10"):
        to_diffusers(td.UNet(num_classes=10))
    with pytest.raises(ValueError, match="context_dim=4"):
        to_diffusers(td.UNet(context_dim=4))
    with pytest.raises(ValueError, match=r"channel_mults=\[2, 4\]"):
        to_diffusers(td.UNet(channel_mults=(2, 4)))
    with pytest.raises(ValueError, match="mid_attention='no_norm'"):
        to_diffusers(td.UNet(mid_attention="no_norm", time_injection="add"))
    with pytest.raises(ValueError, match="num_heads=2 .* different head sizes"):
        to_diffusers(td.UNet(base_channels=16, channel_mults=(1, 2), attention_levels=(0,), num_heads=2, groups=4))
    with pytest.raises(TypeError, match="converts tinyddpm's UNet"):
        to_diffusers(td.MLPDenoiser())


# ------------------------------------------------------------------ refused settings
@pytest.mark.parametrize("setting, value", [
    ("time_embedding_type", "fourier"), ("time_embedding_type", "learned"), ("center_input_sample", True),
    ("num_class_embeds", 10), ("class_embed_type", "timestep"), ("downsample_type", "resnet"),
    ("upsample_type", "resnet"), ("act_fn", "gelu"), ("attn_norm_num_groups", 2), ("mid_block_type", None),
    ("mid_block_scale_factor", 2.0), ("time_embedding_dim", 32), ("freq_shift", 2),
    ("resnet_time_scale_shift", "spatial"), ("block_out_channels", (16, 24)), ("attention_head_dim", 12),
    ("up_block_types", ("UpBlock2D", "AttnUpBlock2D")), ("down_block_types", ("SkipDownBlock2D", "DownBlock2D")),
    ("sample_size", (8, 16)), ("norm_num_groups", None),
])
def test_refused_settings_name_themselves(setting, value):
    config = {**DIFFUSERS_UNET_DEFAULTS, **SMALL, "sample_size": 8, setting: value}
    with pytest.raises(ValueError, match=setting):
        unet_kwargs_from_diffusers(config)


def test_refused_keys_and_classes():
    base = {**DIFFUSERS_UNET_DEFAULTS, **SMALL, "sample_size": 8}
    for key in ("resnet_skip_time_act", "time_embedding_act_fn", "cross_attention_dim"):
        with pytest.raises(ValueError, match=key):
            unet_kwargs_from_diffusers({**base, key: 1})
    with pytest.raises(ValueError, match="_class_name='UNet2DConditionModel'"):
        unet_kwargs_from_diffusers({**base, "_class_name": "UNet2DConditionModel"})
    with pytest.raises(TypeError, match="UNet2DModel or the path"):
        from_diffusers(torch.nn.Linear(2, 2))


def test_defaults_table_matches_the_installed_diffusers():
    sig = inspect.signature(UNet2DModel.__init__).parameters
    installed = {k: p.default for k, p in sig.items() if k != "self"}
    assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in installed.items()} == DIFFUSERS_UNET_DEFAULTS


# ------------------------------------------------------------------ folders: safetensors only, diffusers optional
def test_from_a_save_pretrained_folder_without_diffusers(tmp_path, monkeypatch):
    cfg = LAYOUTS["scale_shift, attn_norm_num_groups set, 8×8×3"]
    u = random_diffusers(cfg)
    u.save_pretrained(tmp_path / "unet", safe_serialization=True)
    x, t = inputs(cfg)
    monkeypatch.setitem(sys.modules, "diffusers", None)      # `import diffusers` now fails
    m = from_diffusers(tmp_path / "unet")
    monkeypatch.undo()
    check_same(m, u, x, t)

    # Old checkpoints name attention query/key/value/proj_attn: renamed on the way in.
    from safetensors.torch import load_file, save_file
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((tmp_path / "unet" / "config.json").read_text())
    sd = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in sd.items():
        for new, legacy in names.items():
            if ".attentions." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{legacy}.")
        renamed[k] = v
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, str(old / "diffusion_pytorch_model.safetensors"))
    check_same(from_diffusers(old), u, x, t)

    del renamed["conv_out.bias"]                              # a tensor missing: refused, not left at random init
    save_file(renamed, str(old / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['conv_out.bias'\]"):
        from_diffusers(old)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "unet" / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never unpickles"):
        from_diffusers(pickled)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_diffusers(tmp_path)
    with pytest.raises(ValueError, match="sample_size"):
        from_diffusers(random_diffusers({**cfg, "sample_size": None}))
    assert from_diffusers(random_diffusers({**cfg, "sample_size": None}), image_size=16).config["image_size"] == 16


# ------------------------------------------------------------------ schedules
def test_schedule_from_and_to_diffusers():
    for sched in (DDPMScheduler(num_train_timesteps=1000), DDIMScheduler(beta_schedule="squaredcos_cap_v2"),
                  DDPMScheduler(beta_schedule="scaled_linear", num_train_timesteps=500)):
        s = td.NoiseSchedule.from_diffusers(sched)
        assert s.T == sched.config.num_train_timesteps and s.betas[0] == 0 and s.alpha_bars[0] == 1
        torch.testing.assert_close(s.betas[1:], sched.betas.double(), rtol=0, atol=0)
        torch.testing.assert_close(s.alpha_bars[1:], sched.alphas_cumprod.double(), rtol=2e-5, atol=0)
    s = td.NoiseSchedule.cosine(200)
    d = s.to_diffusers(prediction="v")
    assert d.config.prediction_type == "v_prediction" and d.config.num_train_timesteps == 200
    assert d.config.clip_sample is False and d.config.variance_type == "fixed_small"
    torch.testing.assert_close(d.betas.double(), s.betas[1:].float().double(), rtol=0, atol=0)
    torch.testing.assert_close(td.NoiseSchedule.from_diffusers(d).alpha_bars, s.alpha_bars, rtol=1e-5, atol=1e-9)
    assert s.to_diffusers(prediction="x0", clip_sample=True).config.prediction_type == "sample"
    with pytest.raises(ValueError, match="prediction must be one of"):
        s.to_diffusers(prediction="epsilon")
    with pytest.raises(TypeError, match="diffusers scheduler"):
        td.NoiseSchedule.from_diffusers(object())


def test_prediction_type_round_trips_through_diffusers():
    s = td.NoiseSchedule.cosine(50)
    for ours in ("eps", "x0", "v"):
        sched = s.to_diffusers(prediction=ours)
        assert td.prediction_from_diffusers(sched) == ours
        assert td.prediction_from_diffusers(DDIMScheduler.from_config(sched.config)) == ours
        assert td.prediction_from_diffusers(dict(sched.config)) == ours
    assert td.prediction_from_diffusers(DDPMScheduler()) == "eps"   # diffusers' default
    with pytest.raises(ValueError, match="'flow_prediction' is not one tinyddpm samples"):
        td.prediction_from_diffusers({"prediction_type": "flow_prediction"})
    with pytest.raises(TypeError, match="prediction_type"):
        td.prediction_from_diffusers(object())


# ------------------------------------------------------------------ samplers across the two libraries
def test_ddim_trajectory_matches_diffusers_ddim_scheduler():
    """diffusers' DDIMScheduler on the exported network = td.ddim_sample on ours: same x_T, same steps."""
    torch.manual_seed(0)
    m = perturb(td.UNet(image_size=8, base_channels=16, groups=4), 5)
    s = td.NoiseSchedule.linear(1000)
    u = to_diffusers(m)
    steps = 10
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = td.ddim_sample(m, s, (2, 1, 8, 8), steps=steps, eta=0.0, spacing="trailing", x_T=x_T)
    sched = DDIMScheduler(num_train_timesteps=1000, trained_betas=s.betas[1:].tolist(), clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    assert [int(i) + 1 for i in sched.timesteps] == ddim_timesteps(1000, steps, "trailing")
    x = x_T.clone()
    with torch.no_grad():
        for i in sched.timesteps:
            x = sched.step(u(x, i).sample, i, x, eta=0.0).prev_sample
    err = (x - ours).abs().max().item()
    assert err < 1e-4 * max(1.0, ours.abs().max().item()), err


def test_v_model_ddim_trajectory_matches_diffusers():
    """A v-predicting network: diffusers' DDIMScheduler (prediction_type="v_prediction") and td.ddim_sample
    (prediction="v") convert its output with the same identity (eq-v), so the trajectories coincide."""
    torch.manual_seed(1)
    m = perturb(td.UNet(image_size=8, base_channels=16, groups=4), 5)
    s = td.NoiseSchedule.cosine(1000)
    u = to_diffusers(m)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = td.ddim_sample(m, s, (2, 1, 8, 8), steps=10, eta=0.0, spacing="trailing", x_T=x_T, prediction="v")
    as_eps = td.ddim_sample(m, s, (2, 1, 8, 8), steps=10, eta=0.0, spacing="trailing", x_T=x_T)
    sched = DDIMScheduler.from_config(s.to_diffusers(prediction="v").config, set_alpha_to_one=True,
                                      timestep_spacing="trailing")
    sched.set_timesteps(10)
    x = x_T.clone()
    with torch.no_grad():
        for i in sched.timesteps:
            x = sched.step(u(x, i).sample, i, x, eta=0.0).prev_sample
    scale = max(1.0, ours.abs().max().item())
    assert (x - ours).abs().max().item() < 1e-4 * scale
    assert (x - as_eps).abs().max().item() > 0.1 * scale      # the prediction type matters


def test_ddpm_pipeline_runs_an_exported_checkpoint(tmp_path):
    from tinyddpm.data.datasets import load_dataset
    from tinyddpm.training.config import DiffusionConfig, TrainConfig
    from tinyddpm.training.trainer import Trainer

    torch.manual_seed(0)
    diff = DiffusionConfig(T=50)
    model = td.UNet(image_size=8, base_channels=16, groups=4)
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=0, device="cpu", progress=False, ckpt_every=0)
    Trainer(model, diff.build(), load_dataset("digits"), cfg, tmp_path / "run", diff).train()
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "unet", "scheduler"}
    assert not list(out.rglob("*.bin"))
    pipe = DDPMPipeline.from_pretrained(out)
    ck = load_checkpoint(tmp_path / "run")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 50])
    check_same(ck.model, pipe.unet.eval(), x, t)
    torch.testing.assert_close(td.NoiseSchedule.from_diffusers(pipe.scheduler).alpha_bars, ck.schedule.alpha_bars,
                               rtol=1e-5, atol=0)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and (images >= 0).all() and (images <= 1).all()
    with pytest.raises(FileExistsError, match="not empty"):
        export_checkpoint(tmp_path / "run", tmp_path / "hf")
