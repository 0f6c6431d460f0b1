"""tinyddpm: diffusion models derived step by step, verified against ground truth."""

from .broadcast import extract
from .distances import energy_distance, sliced_wasserstein
from .mixture import GaussianMixture
from .samplers import (
    ddim_invert,
    ddim_sample,
    ddim_sigma,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    ddpm_step,
    ddpm_variances,
)
from .schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "GaussianMixture",
    "NoiseSchedule",
    "ddim_invert",
    "ddim_sample",
    "ddim_sigma",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_sample",
    "ddpm_step",
    "ddpm_variances",
    "energy_distance",
    "extract",
    "sliced_wasserstein",
]

# --- Each block below is owned by one part of the package; add exports to your block only. ---
# [models]
from .losses import diffusion_loss, diffusion_loss_at, min_snr_weight, sample_timesteps  # noqa: E402
from .mlp import MLPDenoiser  # noqa: E402
from .models import MODEL_KINDS, PRESETS, build_model, count_parameters, model_kind, preset  # noqa: E402
from .nn import timestep_embedding  # noqa: E402
from .unet import UNet  # noqa: E402

__all__ += [
    "MLPDenoiser", "MODEL_KINDS", "PRESETS", "UNet", "build_model", "count_parameters", "diffusion_loss",
    "diffusion_loss_at", "min_snr_weight", "model_kind", "preset", "sample_timesteps", "timestep_embedding",
]
# [/models]
# [data]
from .cache import cache_dir  # noqa: E402
from .data import DATASETS, Dataset, load_dataset, toy_mixture  # noqa: E402
from .images import load_image, make_grid, save_grid, to_uint8  # noqa: E402
from .metrics import (  # noqa: E402
    DigitsClassifier,
    digits_classifier,
    digits_metrics,
    format_metrics,
    frechet_distance,
    toy_metrics,
)

__all__ += [
    "DATASETS", "Dataset", "DigitsClassifier", "cache_dir", "digits_classifier", "digits_metrics", "format_metrics",
    "frechet_distance", "load_dataset", "load_image", "make_grid", "save_grid", "to_uint8", "toy_metrics",
    "toy_mixture",
]
# [/data]
# [training]
from .checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from .config import DiffusionConfig, TrainConfig  # noqa: E402
from .ema import EMA  # noqa: E402
from .pretrained import RECIPES, load_or_train  # noqa: E402
from .train import Trainer, TrainingDiverged  # noqa: E402

__all__ += [
    "Checkpoint", "DiffusionConfig", "EMA", "RECIPES", "TrainConfig", "Trainer", "TrainingDiverged", "load_checkpoint",
    "load_or_train",
]
# [/training]
# [solvers]
from .guidance import ClassMixture, cfg_combine, guided_model  # noqa: E402
from .solvers import (  # noqa: E402
    SAMPLERS,
    count_nfe,
    dpmpp_2m_sample,
    euler_ancestral_sample,
    plms_sample,
    sample,
)

__all__ += [
    "SAMPLERS", "ClassMixture", "cfg_combine", "count_nfe", "dpmpp_2m_sample", "euler_ancestral_sample",
    "guided_model", "plms_sample", "sample",
]
# [/solvers]
# [latent]
from .attention import MultiHeadAttention, SpatialTransformer, attention  # noqa: E402
from .latent import (  # noqa: E402
    CrossAttnUNet,
    CrossAttnUNetConfig,
    Text2ImgConfig,
    TextToImage,
    load_or_train_text2img,
    sample_prompt,
    train_text2img,
)
from .text import TextEncoder, TextEncoderConfig, Tokenizer, measure_ink, measure_slant  # noqa: E402
from .vae import VAE, VAEConfig, train_vae  # noqa: E402

__all__ += [
    "VAE", "CrossAttnUNet", "CrossAttnUNetConfig", "MultiHeadAttention", "SpatialTransformer", "Text2ImgConfig",
    "TextEncoder", "TextEncoderConfig", "TextToImage", "Tokenizer", "VAEConfig", "attention",
    "load_or_train_text2img", "measure_ink", "measure_slant", "sample_prompt", "train_text2img", "train_vae",
]
# [/latent]
