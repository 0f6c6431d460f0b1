"""Build a denoiser from (kind, config): the registry, named presets and a parameter count.

A checkpoint stores ``model_kind(model)`` and ``model.config``; ``build_model(kind, config)`` rebuilds
the same network. Presets are starting points, from a CPU-sized digits model to the DDPM paper's
35.7 M-parameter CIFAR-10 UNet.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from types import MappingProxyType

from torch import nn

from ..checks import check_choice
from .mlp import MLPDenoiser
from .unet import UNet

MODEL_KINDS: Mapping[str, type[nn.Module]] = MappingProxyType({"unet": UNet, "mlp": MLPDenoiser})

PRESETS: Mapping[str, tuple[str, Mapping]] = MappingProxyType({
    # 8×8×1 scikit-learn digits on a CPU: 0.76 M parameters.
    "digits-tiny": ("unet", MappingProxyType(dict(
        in_channels=1, image_size=8, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
        attention_levels=(1,), groups=8))),
    # 28×28×1 MNIST / Fashion-MNIST: levels at 28, 14, 7 (7×7 attention); 6.9 M parameters.
    "mnist": ("unet", MappingProxyType(dict(
        in_channels=1, image_size=28, base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2,
        attention_levels=(2,), groups=16, dropout=0.1))),
    # 32×32×3 CIFAR-10 at a laptop/one-GPU size: levels at 32, 16, 8 (16×16 attention); 6.9 M parameters.
    "cifar10-small": ("unet", MappingProxyType(dict(
        in_channels=3, image_size=32, base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2,
        attention_levels=(1,), groups=32, dropout=0.1))),
    # The DDPM paper's CIFAR-10 model (Ho et al. 2020, App. B): ch=128, mults (1,2,2,2), 2 ResBlocks
    # per level, attention at 16×16, dropout 0.1, GroupNorm(32), additive time embedding, single-head
    # attention: 35,746,307 parameters, the paper's "35.7M".
    "cifar10-ddpm": ("unet", MappingProxyType(dict(
        in_channels=3, image_size=32, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
        attention_levels=(1,), num_heads=1, groups=32, dropout=0.1, time_injection="add"))),
    # 2-D toy data (mixtures, moons, swiss roll).
    "toy-mlp": ("mlp", MappingProxyType(dict(dim=2, hidden=128, depth=3, time_dim=64))),
})


def _kwargs_of(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def build_model(kind: str, config: Mapping) -> nn.Module:
    """``MODEL_KINDS[kind](**config)``, with a clear error for an unknown kind or argument."""
    check_choice("kind", kind, MODEL_KINDS)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of constructor arguments; got {type(config).__name__}")
    cls = MODEL_KINDS[kind]
    valid = _kwargs_of(cls)
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for {cls.__name__} (kind {kind!r}); valid: {', '.join(valid)}")
    return cls(**config)


def model_kind(model: nn.Module) -> str:
    """The registry name of a model's class ('unet', 'mlp'), looking through DDP and torch.compile wrappers."""
    inner = model
    for attr in ("_orig_mod", "module", "_orig_mod"):
        inner = getattr(inner, attr, inner)
    for kind, cls in MODEL_KINDS.items():
        if type(inner) is cls:
            return kind
    raise ValueError(f"{type(inner).__name__} is not a registered model kind; registered: {', '.join(MODEL_KINDS)}")


def preset(name: str, **overrides) -> tuple[str, dict]:
    """The (kind, config) of a named preset, with ``overrides`` applied, e.g. ``preset("mnist", num_classes=10)``."""
    check_choice("preset", name, PRESETS)
    kind, config = PRESETS[name]
    config = copy.deepcopy(dict(config))
    valid = _kwargs_of(MODEL_KINDS[kind])
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for preset {name!r} ({kind}); valid: {', '.join(valid)}")
    config.update(overrides)
    return kind, config


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
