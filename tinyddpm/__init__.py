"""tinyddpm: diffusion models derived step by step, verified against ground truth."""

from .attention import MultiHeadAttention, SpatialTransformer, attention
from .broadcast import extract
from .cache import cache_dir
from .checkpoint import Checkpoint, load_checkpoint
from .config import DiffusionConfig, TrainConfig
from .data import DATASETS, Dataset, load_dataset, toy_mixture
from .distances import energy_distance, sliced_wasserstein
from .ema import EMA
from .guidance import ClassMixture, cfg_combine, guided_model
from .images import load_image, make_grid, save_grid, to_uint8
from .latent import (
    CrossAttnUNet,
    CrossAttnUNetConfig,
    Text2ImgConfig,
    TextToImage,
    load_or_train_text2img,
    sample_prompt,
    train_text2img,
)
from .losses import diffusion_loss, diffusion_loss_at, min_snr_weight, sample_timesteps
from .metrics import (
    DigitsClassifier,
    digits_classifier,
    digits_metrics,
    format_metrics,
    frechet_distance,
    toy_metrics,
    within_class_diversity,
)
from .mixture import GaussianMixture
from .mlp import MLPDenoiser
from .models import MODEL_KINDS, PRESETS, build_model, count_parameters, model_kind, preset
from .nn import timestep_embedding
from .pretrained import RECIPES, load_or_train
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
from .solvers import SAMPLERS, count_nfe, dpmpp_2m_sample, euler_ancestral_sample, plms_sample, sample
from .text import TextEncoder, TextEncoderConfig, Tokenizer, measure_ink, measure_slant
from .train import Trainer, TrainingDiverged
from .unet import UNet
from .vae import VAE, VAEConfig, train_vae

__version__ = "0.1.0"

__all__ = [
    "attention",
    "build_model",
    "cache_dir",
    "cfg_combine",
    "Checkpoint",
    "ClassMixture",
    "count_nfe",
    "count_parameters",
    "CrossAttnUNet",
    "CrossAttnUNetConfig",
    "Dataset",
    "DATASETS",
    "ddim_invert",
    "ddim_sample",
    "ddim_sigma",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_sample",
    "ddpm_step",
    "ddpm_variances",
    "diffusion_loss",
    "diffusion_loss_at",
    "DiffusionConfig",
    "digits_classifier",
    "digits_metrics",
    "DigitsClassifier",
    "dpmpp_2m_sample",
    "EMA",
    "energy_distance",
    "euler_ancestral_sample",
    "extract",
    "format_metrics",
    "frechet_distance",
    "GaussianMixture",
    "guided_model",
    "load_checkpoint",
    "load_dataset",
    "load_image",
    "load_or_train",
    "load_or_train_text2img",
    "make_grid",
    "measure_ink",
    "measure_slant",
    "min_snr_weight",
    "MLPDenoiser",
    "model_kind",
    "MODEL_KINDS",
    "MultiHeadAttention",
    "NoiseSchedule",
    "plms_sample",
    "preset",
    "PRESETS",
    "RECIPES",
    "sample",
    "sample_prompt",
    "sample_timesteps",
    "SAMPLERS",
    "save_grid",
    "sliced_wasserstein",
    "SpatialTransformer",
    "Text2ImgConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "TextToImage",
    "timestep_embedding",
    "to_uint8",
    "Tokenizer",
    "toy_metrics",
    "toy_mixture",
    "train_text2img",
    "train_vae",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "UNet",
    "VAE",
    "VAEConfig",
    "within_class_diversity",
]
