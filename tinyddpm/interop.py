"""Exact conversion between tinyddpm's :class:`~tinyddpm.nets.unet.UNet` and diffusers' ``UNet2DModel``.

The two networks compute the same function; only names, one fused layer and the time index differ:

- **Time index.** diffusers numbers the steps i = 0..T-1, we number them t = 1..T (paper indexing),
  so ``m(x, t) == unet(x, t - 1).sample``. A model read from diffusers gets ``time_shift=-1`` (its
  embedding reads t - 1, bit for bit what diffusers computes). A model trained here has
  ``time_shift=0``; diffusers has no shift, so :func:`to_diffusers` folds it into the first time
  layer instead: sin((i+δ)ω), cos((i+δ)ω) is a rotation of sin(iω), cos(iω) by the angle δω, a
  linear map R(δ), and ``linear_1(R(δ) e) = (W R(δ)) e + b`` — exact up to float32 round-off.
- **Time projections.** Our UNet stacks every ResBlock's ``time_emb_proj`` into one ``emb_proj``
  Linear (rows in run order: down, middle, up); the conversion splits and concatenates it.
- **Names.** ``down.{i}.res.{j}`` ↔ ``down_blocks.{i}.resnets.{j}`` and so on (:func:`_module_pairs`).

diffusers stays optional: it is imported inside the functions that build its objects, and
:func:`from_diffusers` on a folder reads ``config.json`` + safetensors weights without it. Pickled
weights (``.bin``) are refused: loading them would run arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .nets.unet import AttentionBlock, ResBlock, UNet

# UNet2DModel.__init__'s defaults (diffusers 0.42; a test compares them with the installed version).
DIFFUSERS_UNET_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D", up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None,
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _refuse(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"diffusers setting {name}={value!r} is not supported: {why}")


# ------------------------------------------------------------------ configs
def unet_kwargs_from_diffusers(config: Mapping[str, Any], image_size: int | None = None) -> dict[str, Any]:
    """Our ``UNet(**kwargs)`` for a ``UNet2DModel`` config; ValueError naming any setting we cannot express."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_UNET_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown diffusers UNet2DModel setting(s) {unknown}: not a UNet2DModel config, or a "
                         f"newer diffusers; tinyddpm converts only the settings of UNet2DModel.__init__")
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(f"only diffusers' UNet2DModel converts to tinyddpm's UNet; got _class_name={name!r}")
    c = {**DIFFUSERS_UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    fixed = dict(center_input_sample=False, time_embedding_type="positional", mid_block_type="UNetMidBlock2D",
                 downsample_type="conv", upsample_type="conv", class_embed_type=None, num_class_embeds=None)
    for key, ok in fixed.items():
        if c[key] != ok:
            raise _refuse(key, c[key], f"tinyddpm's UNet has only {key}={ok!r}")
    if c["act_fn"] not in ("silu", "swish"):
        raise _refuse("act_fn", c["act_fn"], "tinyddpm's UNet uses SiLU ('silu' or 'swish')")
    if c["mid_block_scale_factor"] != 1:
        raise _refuse("mid_block_scale_factor", c["mid_block_scale_factor"], "only 1 (no rescaling) is supported")
    if c["freq_shift"] not in (0, 1) or isinstance(c["freq_shift"], bool):
        raise _refuse("freq_shift", c["freq_shift"], "only 0 or 1")
    if not isinstance(c["flip_sin_to_cos"], bool):
        raise _refuse("flip_sin_to_cos", c["flip_sin_to_cos"], "must be a bool")
    boc = [int(b) for b in c["block_out_channels"]]
    base = boc[0]
    if any(b % base for b in boc):
        raise _refuse("block_out_channels", c["block_out_channels"],
                      f"every entry must be an integer multiple of the first ({base})")
    if c["time_embedding_dim"] not in (None, 4 * base):
        raise _refuse("time_embedding_dim", c["time_embedding_dim"], f"only None or 4 × {base} = {4 * base}")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    L = len(boc)
    if len(down) != L or len(up) != L:
        raise _refuse("down_block_types", down, f"need one down and one up block per entry of block_out_channels ({L})")
    for key, types, kinds in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                              ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):
        bad = [b for b in types if b not in kinds]
        if bad:
            raise _refuse(key, types, f"only {kinds[0]!r} and {kinds[1]!r} blocks; got {bad}")
    attn = [i for i, b in enumerate(down) if b == "AttnDownBlock2D"]
    attn_up = sorted(L - 1 - k for k, b in enumerate(up) if b == "AttnUpBlock2D")
    if attn != attn_up:
        raise _refuse("up_block_types", up, f"attention must sit at the same levels going up as going down "
                                            f"(down_block_types has it at levels {attn}, up_block_types at {attn_up})")
    groups = c["norm_num_groups"]
    if groups is None:
        raise _refuse("norm_num_groups", None, "give the number of GroupNorm groups")
    mid = "none"
    if c["add_attention"]:
        ang = c["attn_norm_num_groups"]
        if ang not in (None, groups):
            raise _refuse("attn_norm_num_groups", ang, f"only None or norm_num_groups ({groups})")
        mid = "norm" if ang is not None or c["resnet_time_scale_shift"] == "default" else "no_norm"
    shift = {"default": "add", "scale_shift": "scale_shift"}.get(c["resnet_time_scale_shift"])
    if shift is None:
        raise _refuse("resnet_time_scale_shift", c["resnet_time_scale_shift"], "only 'default' or 'scale_shift'")
    head_dim = c["attention_head_dim"]
    if head_dim is not None:
        for ch in sorted({boc[i] for i in attn} | ({boc[-1]} if mid != "none" else set())):
            if ch % head_dim:
                raise _refuse("attention_head_dim", head_dim, f"must divide the channels of every attention layer; "
                                                              f"{ch} is not a multiple")
    if image_size is None:
        size = c["sample_size"]
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise _refuse("sample_size", size, "tinyddpm's UNet is square; pass image_size=")
            size = size[0]
        if size is None:
            raise _refuse("sample_size", None, "pass image_size= to from_diffusers")
        image_size = int(size)
    return dict(
        in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]), image_size=image_size,
        base_channels=base, channel_mults=[b // base for b in boc], num_res_blocks=int(c["layers_per_block"]),
        attention_levels=attn, num_heads=1, dropout=float(c["dropout"]), groups=int(groups),
        time_injection=shift, norm_eps=float(c["norm_eps"]), downsample_padding=c["downsample_padding"],
        head_dim=None if head_dim is None else int(head_dim), mid_attention=mid,
        flip_sin_to_cos=c["flip_sin_to_cos"], freq_shift=int(c["freq_shift"]), time_shift=-1,
    )


def diffusers_config_from_unet(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``UNet2DModel(**kwargs)`` of our UNet's config; ValueError for what UNet2DModel cannot express."""
    cfg = dict(config)
    for key in ("num_classes", "context_dim"):
        if cfg.get(key) is not None:
            raise ValueError(f"{key}={cfg[key]!r}: conditional UNets do not export to diffusers' UNet2DModel "
                             f"(only unconditional ones)")
    mults, base = cfg["channel_mults"], cfg["base_channels"]
    if mults[0] != 1:
        raise ValueError(f"channel_mults={list(mults)}: diffusers' UNet2DModel needs channel_mults[0] == 1 "
                         f"(its first level has conv_in's width)")
    chans = [base * m for m in mults]
    L, attn = len(chans), set(cfg["attention_levels"])
    mid = cfg.get("mid_attention", "norm")
    scale_shift = cfg["time_injection"] == "scale_shift"
    if mid == "no_norm" and not scale_shift:
        raise ValueError("mid_attention='no_norm' exports only with time_injection='scale_shift' (diffusers' "
                         "additive UNet2DModel always normalises before its middle attention)")
    attn_chans = sorted({chans[i] for i in attn} | ({chans[-1]} if mid != "none" else set()))
    if cfg.get("head_dim") is not None:
        head_dim = cfg["head_dim"]
    elif cfg["num_heads"] == 1:
        head_dim = None                                        # diffusers: one head of all the channels
    else:
        dims = {c // cfg["num_heads"] for c in attn_chans}
        if len(dims) > 1:
            raise ValueError(f"num_heads={cfg['num_heads']} over attention layers of {attn_chans} channels gives "
                             f"different head sizes {sorted(dims)}; diffusers' attention_head_dim is one size")
        head_dim = dims.pop() if dims else None
    return dict(
        sample_size=cfg["image_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        center_input_sample=False, time_embedding_type="positional", freq_shift=cfg.get("freq_shift", 1),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", False),
        down_block_types=["AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(L)],
        up_block_types=["AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(L))],
        block_out_channels=chans, layers_per_block=cfg["num_res_blocks"], mid_block_scale_factor=1,
        downsample_padding=cfg.get("downsample_padding", 1), downsample_type="conv", upsample_type="conv",
        dropout=cfg["dropout"], act_fn="silu", attention_head_dim=head_dim, norm_num_groups=cfg["groups"],
        attn_norm_num_groups=cfg["groups"] if scale_shift and mid == "norm" else None,
        norm_eps=cfg.get("norm_eps", 1e-5), resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        add_attention=mid != "none",
    )


# ------------------------------------------------------------------ weights
def _module_pairs(model: UNet) -> list[tuple[nn.Module, str, str]]:
    """(our module, our name, diffusers' name) for every layer with parameters except ``emb_proj``."""
    pairs = [(model.time_emb.mlp[0], "time_emb.mlp.0", "time_embedding.linear_1"),
             (model.time_emb.mlp[2], "time_emb.mlp.2", "time_embedding.linear_2"),
             (model.conv_in, "conv_in", "conv_in"), (model.norm_out, "norm_out", "conv_norm_out"),
             (model.conv_out, "conv_out", "conv_out")]
    parts = [(lv, f"down.{i}", f"down_blocks.{i}", "downsamplers") for i, lv in enumerate(model.down)]
    parts += [(model.mid, "mid", "mid_block", None)]
    parts += [(lv, f"up.{i}", f"up_blocks.{i}", "upsamplers") for i, lv in enumerate(model.up)]
    for level, ours, theirs, resampler in parts:
        for j, (res, attn) in enumerate(zip(level.res, level.attn, strict=True)):
            for sub, name in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                              ("skip", "conv_shortcut")):
                if getattr(res, sub) is not None:
                    pairs.append((getattr(res, sub), f"{ours}.res.{j}.{sub}", f"{theirs}.resnets.{j}.{name}"))
            if isinstance(attn, AttentionBlock):
                a, b = f"{ours}.attn.{j}", f"{theirs}.attentions.{j}"
                if attn.norm is not None:
                    pairs.append((attn.norm, f"{a}.norm", f"{b}.group_norm"))
                for sub in ("to_q", "to_k", "to_v"):
                    pairs.append((getattr(attn.attn, sub), f"{a}.attn.{sub}", f"{b}.{sub}"))
                pairs.append((attn.attn.to_out, f"{a}.attn.to_out", f"{b}.to_out.0"))
        if level.resample is not None:
            pairs.append((level.resample.conv, f"{ours}.resample.conv", f"{theirs}.{resampler}.0.conv"))
    return pairs


def _time_proj_names(model: UNet) -> list[tuple[ResBlock, str]]:
    """Each ResBlock and the name of its diffusers ``time_emb_proj``, in run order (= emb_proj's rows)."""
    names = [f"down_blocks.{i}.resnets.{j}" for i, lv in enumerate(model.down) for j in range(len(lv.res))]
    names += ["mid_block.resnets.0", "mid_block.resnets.1"]
    names += [f"up_blocks.{i}.resnets.{j}" for i, lv in enumerate(model.up) for j in range(len(lv.res))]
    blocks = model.res_blocks()
    assert len(blocks) == len(names)
    return [(b, f"{n}.time_emb_proj") for b, n in zip(blocks, names, strict=True)]


def _shift_rotation(model: UNet, delta: int) -> Tensor:
    """R(δ) (float64, dim × dim) with sinusoids(t + δ) = R(δ) sinusoids(t) for every t."""
    te = model.time_emb
    half = te.dim // 2
    i = torch.arange(half, dtype=torch.float32)
    omega = torch.exp(-math.log(te.max_period) * i / max(half - te.freq_shift, 1)).double()  # the float32 ω used
    c, s = torch.cos(delta * omega), torch.sin(delta * omega)
    sin_at, cos_at = (half, 0) if te.flip_sin_to_cos else (0, half)       # where each block starts
    R = torch.zeros(te.dim, te.dim, dtype=torch.float64)
    k = torch.arange(half)
    R[sin_at + k, sin_at + k] = c                                         # sin(a + b) = sin a cos b + cos a sin b
    R[sin_at + k, cos_at + k] = s
    R[cos_at + k, sin_at + k] = -s                                        # cos(a + b) = cos a cos b - sin a sin b
    R[cos_at + k, cos_at + k] = c
    if te.dim % 2:
        R[-1, -1] = 1.0                                                   # the zero pad column stays zero
    return R


def state_dict_to_diffusers(model: UNet) -> dict[str, Tensor]:
    """Our UNet's weights under diffusers' names, with ``unet(x, t - 1) == model(x, t)``."""
    sd: dict[str, Tensor] = {}
    for module, _, theirs in _module_pairs(model):
        for p in ("weight", "bias"):
            if getattr(module, p, None) is not None:
                sd[f"{theirs}.{p}"] = getattr(module, p).detach().clone()
    W, b = model.emb_proj.weight.detach(), model.emb_proj.bias.detach()
    start = 0
    for block, name in _time_proj_names(model):
        n = block.emb_channels
        sd[f"{name}.weight"], sd[f"{name}.bias"] = W[start:start + n].clone(), b[start:start + n].clone()
        start += n
    delta = 1 + model.time_emb.time_shift            # diffusers embeds i = t - 1; we embed t + time_shift
    if delta:
        w1 = sd["time_embedding.linear_1.weight"]
        sd["time_embedding.linear_1.weight"] = (w1.double() @ _shift_rotation(model, delta)).to(w1.dtype)
    return sd


def state_dict_from_diffusers(model: UNet, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' UNet2DModel weights under our names (for a model built with time_shift = -1)."""
    sd = _rename_deprecated_attention(dict(sd))
    expected = {f"{theirs}.{p}" for m, _, theirs in _module_pairs(model) for p in ("weight", "bias")
                if getattr(m, p, None) is not None}
    expected |= {f"{n}.{p}" for _, n in _time_proj_names(model) for p in ("weight", "bias")}
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        more = lambda names: f"{names[:5]}{' ...' if len(names) > 5 else ''}"  # noqa: E731
        raise ValueError(f"the diffusers weights do not fit the UNet its config describes: missing {more(missing)}, "
                         f"unexpected {more(extra)}")
    out: dict[str, Tensor] = {}
    for module, ours, theirs in _module_pairs(model):
        for p in ("weight", "bias"):
            if getattr(module, p, None) is not None:
                out[f"{ours}.{p}"] = sd[f"{theirs}.{p}"]
    names = [n for _, n in _time_proj_names(model)]
    out["emb_proj.weight"] = torch.cat([sd[f"{n}.weight"] for n in names])
    out["emb_proj.bias"] = torch.cat([sd[f"{n}.bias"] for n in names])
    return out


def _rename_deprecated_attention(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old diffusers checkpoints name attention layers query/key/value/proj_attn; now to_q/to_k/to_v/to_out.0."""
    old = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) >= 3 and ".attentions." in f".{k}" and parts[-2] in old:
            k = ".".join([*parts[:-2], old[parts[-2]], parts[-1]])
        out[k] = v
    return out


# ------------------------------------------------------------------ folders
def _read_folder(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors.torch import load_file

    if (path / "model_index.json").is_file() and (path / "unet").is_dir():
        path = path / "unet"                                  # a pipeline folder: take its UNet
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: expected a diffusers save_pretrained folder")
    config = json.loads(cfg_file.read_text(encoding="utf-8"))
    weights, index = path / WEIGHTS, path / f"{WEIGHTS}.index.json"
    if weights.is_file():
        return config, load_file(str(weights))
    if index.is_file():                                       # sharded safetensors
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(path / shard)))
        return config, sd
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ValueError(f"{path} holds only pickled weights ({', '.join(pickled)}); tinyddpm never unpickles (it "
                         f"can run arbitrary code). Convert them where you trust the file: "
                         f"UNet2DModel.from_pretrained(path).save_pretrained(out, safe_serialization=True)")
    raise FileNotFoundError(f"{path} has no {WEIGHTS}")


def _unwrap(model: nn.Module) -> nn.Module:
    for attr in ("_orig_mod", "module", "_orig_mod"):
        model = getattr(model, attr, model)
    return model


# ------------------------------------------------------------------ public
def from_diffusers(unet_or_path: Any, *, image_size: int | None = None) -> UNet:
    """tinyddpm's UNet computing the same function as a diffusers ``UNet2DModel``: ``m(x, t) == unet(x, t - 1)``.

    ``unet_or_path``: a ``UNet2DModel``, or a ``save_pretrained`` folder (UNet or whole pipeline) read
    with safetensors only, without diffusers. ``image_size`` overrides the config's ``sample_size``.
    The model comes back in float32 and eval mode, with ``time_shift=-1`` in its config.
    """
    if isinstance(unet_or_path, (str, os.PathLike)):
        config, sd = _read_folder(Path(unet_or_path))
        device = torch.device("cpu")
    elif type(unet_or_path).__name__ == "UNet2DModel" and hasattr(unet_or_path, "state_dict"):
        config, sd = dict(unet_or_path.config), unet_or_path.state_dict()
        device = next(unet_or_path.parameters()).device
    else:
        raise TypeError(f"from_diffusers takes a diffusers UNet2DModel or the path of its save_pretrained folder; "
                        f"got {type(unet_or_path).__name__}")
    model = UNet(**unet_kwargs_from_diffusers(config, image_size))
    model.load_state_dict(state_dict_from_diffusers(model, sd))
    return model.to(device).eval()


def to_diffusers(model: nn.Module) -> Any:
    """A diffusers ``UNet2DModel`` computing the same function: ``unet(x, t - 1).sample == model(x, t)``.

    Same device, dtype and train/eval mode as ``model``. Needs diffusers installed.
    """
    model = _unwrap(model)
    if not isinstance(model, UNet):
        raise TypeError(f"to_diffusers converts tinyddpm's UNet; got {type(model).__name__}")
    from diffusers import UNet2DModel
    from diffusers.utils import logging as dlogging

    kwargs = diffusers_config_from_unet(model.config)
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()                  # silence "attention_head_dim=None is not recommended"
    try:
        with torch.device("meta"):                  # no random init: every tensor is assigned below
            unet = UNet2DModel(**kwargs)
    finally:
        dlogging.set_verbosity(level)
    p = next(model.parameters())
    sd = {k: v.to(device=p.device, dtype=p.dtype) for k, v in state_dict_to_diffusers(model).items()}
    unet.load_state_dict(sd, assign=True)           # strict: every diffusers tensor is set exactly once
    left = [k for k, v in unet.state_dict().items() if v.is_meta]
    if left:
        raise RuntimeError(f"to_diffusers left tensors unset: {left[:5]}")
    return unet.train(model.training)


def prediction_from_diffusers(scheduler: Any) -> str:
    """What a diffusers model predicts, read from its scheduler's ``prediction_type``: 'eps' | 'x0' | 'v'.

    Pass it to the samplers (``td.sample(..., prediction=...)``): a v-model sampled as an ε-model gives
    noise. ``scheduler`` is a diffusers scheduler object or its config mapping.
    """
    from .diffusion.schedule import DIFFUSERS_PREDICTION_TYPES

    config = scheduler if isinstance(scheduler, Mapping) else getattr(scheduler, "config", None)
    if not isinstance(config, Mapping) or "prediction_type" not in config:
        raise TypeError(f"expected a diffusers scheduler (or its config) with a prediction_type; "
                        f"got {type(scheduler).__name__}")
    ours = {theirs: name for name, theirs in DIFFUSERS_PREDICTION_TYPES.items()}
    kind = config["prediction_type"]
    if kind not in ours:
        raise ValueError(f"prediction_type {kind!r} is not one tinyddpm samples; expected one of {sorted(ours)}")
    return ours[kind]


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, ema: bool = True) -> Path:
    """Write a tinyddpm checkpoint as a diffusers ``DDPMPipeline`` folder (unet/, scheduler/, model_index.json).

    Safetensors weights; ``DDPMPipeline.from_pretrained(out_dir)`` loads it. The scheduler carries our
    β's exactly (``trained_betas``) and the checkpoint's prediction type. Written atomically.
    """
    from diffusers import DDPMPipeline

    from .atomic import write_dir_atomic
    from .nets.presets import model_kind
    from .training.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt_dir, ema=ema)
    if model_kind(ck.model) != "unet":
        raise ValueError(f"only UNet checkpoints export to diffusers; this one holds a {ck.model_kind!r} model")
    pipe = DDPMPipeline(unet=to_diffusers(ck.model), scheduler=ck.schedule.to_diffusers(prediction=ck.prediction))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    return write_dir_atomic(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
