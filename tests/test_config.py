"""Frozen configs: validation at the boundary, JSON round-trip, unknown keys named, the lr schedule."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from tinyddpm.config_base import Config
from tinyddpm.nets.cross_attn_unet import CrossAttnUNetConfig
from tinyddpm.nets.text import TextEncoderConfig
from tinyddpm.nets.vae import VAEConfig
from tinyddpm.text2img import Text2ImgConfig
from tinyddpm.training.config import DiffusionConfig, TrainConfig


def test_defaults_round_trip_through_json():
    for cfg in (DiffusionConfig(), TrainConfig(), DiffusionConfig("cosine", 50, "v", True),
                TrainConfig(steps=7, lr=3e-4, device="cpu", weighting="min_snr", lr_schedule="cosine")):
        back = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 1.0  # type: ignore[misc]


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match="unknown TrainConfig key.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3, "steps": 3})
    with pytest.raises(ValueError, match="unknown DiffusionConfig key.*beta_end"):
        DiffusionConfig.from_dict({"beta_end": 0.02})
    with pytest.raises(ValueError, match="unknown TrainConfig key.*lrr"):
        TrainConfig().replace(lrr=1.0)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"schedule": "quadratic"}, ValueError, "schedule must be one of 'linear', 'cosine'"),
        ({"T": 0}, ValueError, "T must be >= 1"),
        ({"T": 10.0}, TypeError, "T must be an integer"),
        ({"prediction": "noise"}, ValueError, "prediction must be one of 'eps', 'x0', 'v'"),
        ({"zero_terminal_snr": 1}, TypeError, "zero_terminal_snr must be True or False"),
        ({"zero_terminal_snr": True}, ValueError, "use prediction='v'"),
    ],
)
def test_diffusion_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DiffusionConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"steps": -1}, ValueError, "steps must be >= 0"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"lr": 0}, ValueError, "lr must be > 0"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number"),
        ({"lr": "1e-3"}, TypeError, "lr must be a number"),
        ({"ema_decay": 1.0}, ValueError, r"ema_decay must lie in \[0, 1\)"),
        ({"ema_decay": -0.1}, ValueError, "ema_decay must be a finite number >= 0"),
        ({"device": "gpu"}, ValueError, "device must be one of 'auto', 'cpu', 'cuda'"),
        ({"weighting": "snr"}, ValueError, "weighting must be one of 'none', 'min_snr'"),
        ({"lr_schedule": "step"}, ValueError, "lr_schedule must be one of 'constant', 'cosine'"),
        ({"precision": "half"}, ValueError, "precision must be one of 'auto', 'fp32', 'bf16', 'fp16'"),
        ({"compile": "yes"}, TypeError, "compile must be True or False"),
        ({"accum_steps": 0}, ValueError, "accum_steps must be >= 1"),
        ({"batch_size": 6, "accum_steps": 4}, ValueError, "batch_size 6 must be divisible by accum_steps 4"),
        ({"ckpt_every": -1}, ValueError, "ckpt_every must be >= 0"),
        ({"ckpt_minutes": -1.0}, ValueError, "ckpt_minutes must be a finite number >= 0"),
        ({"label_dropout": 1.0}, ValueError, r"label_dropout must lie in \[0, 1\)"),
        ({"min_snr_gamma": 0.0}, ValueError, "min_snr_gamma must be > 0"),
        ({"keep_last": 0}, ValueError, "keep_last must be >= 1"),
        ({"grad_clip": -1.0}, ValueError, "grad_clip must be a finite number >= 0"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
    ],
)
def test_train_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TrainConfig(**kwargs)


def test_diffusion_config_builds_the_named_schedule():
    s = DiffusionConfig("cosine", T=20).build()
    ref = torch.tensor([math.cos((t / 20 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(21)], dtype=torch.float64)
    ref = ref / ref[0]
    assert torch.allclose(s.alpha_bars[:20], ref[:20], rtol=0, atol=1e-12)
    assert float(s.alpha_bars[20]) == pytest.approx(float(ref[19]) * 0.001, rel=1e-12)  # β_T clipped at 0.999
    z = DiffusionConfig("linear", T=30, prediction="v", zero_terminal_snr=True).build()
    assert z.T == 30 and float(z.alpha_bars[-1]) == 0.0


def test_lr_warmup_then_constant_or_cosine():
    c = TrainConfig(steps=110, lr=1.0, warmup_steps=10)
    assert [c.lr_at(i) for i in (0, 4, 9, 10, 109)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    k = c.replace(lr_schedule="cosine")
    # after warm-up: 0.5 (1 + cos(π (step - 10) / 100))
    for step in (10, 35, 60, 85, 109):
        assert k.lr_at(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 10) / 100)), abs=1e-12)
    assert TrainConfig(warmup_steps=0, lr=0.3).lr_at(0) == 0.3


def test_every_config_shares_one_style():
    """One base: JSON round-trip (nested configs rebuilt), unknown keys named, validated replace."""
    nested = Text2ImgConfig(vae=VAEConfig(channels=8), text=TextEncoderConfig(vocab_size=0, dim=16, heads=2),
                            unet=CrossAttnUNetConfig(channels=8, context_dim=16, heads=2, groups=4),
                            diffusion=DiffusionConfig("cosine", 50), text_encoder="joint")
    for cfg in (VAEConfig(beta=0.1), TextEncoderConfig(vocab_size=30), CrossAttnUNetConfig(channels=8), nested):
        assert isinstance(cfg, Config)
        back = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and type(back) is type(cfg)
        with pytest.raises(ValueError, match=f"unknown {type(cfg).__name__} key.*typo"):
            type(cfg).from_dict({**cfg.to_dict(), "typo": 1})
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.seed = 1  # type: ignore[misc]
    assert isinstance(Text2ImgConfig.from_dict(nested.to_dict()).unet, CrossAttnUNetConfig)
    with pytest.raises(ValueError, match="unknown VAEConfig key.*chanels"):
        Text2ImgConfig.from_dict({**nested.to_dict(), "vae": {"chanels": 8}})
    with pytest.raises(ValueError, match="must be divisible by groups"):
        VAEConfig().replace(channels=12)
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by heads \(4\)"):
        TextEncoderConfig(vocab_size=5, dim=10)


def test_old_bf16_key_migrates_to_precision():
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "precision"}
    assert TrainConfig.from_dict({**old, "bf16": True}).precision == "auto"     # bf16 on CUDA only, as before
    assert TrainConfig.from_dict({**old, "bf16": False}).precision == "fp32"


def test_checkpoint_interval_default_is_a_tenth_of_the_run():
    assert TrainConfig(steps=2000).checkpoint_interval == 200
    assert TrainConfig(steps=15).checkpoint_interval == 2
    assert TrainConfig(steps=5, ckpt_every=3).checkpoint_interval == 3
    assert TrainConfig(ckpt_every=0).checkpoint_interval == 0
    assert TrainConfig().ckpt_minutes == 5.0
