"""tinyddpm: diffusion models derived step by step, verified against ground truth."""

from .cache import cache_dir
from .data.datasets import DATASETS, Dataset, load_dataset, toy_mixture
from .data.images import load_image, make_grid, save_grid, to_uint8
from .diffusion.broadcast import extract
from .diffusion.distances import energy_distance, sliced_wasserstein
from .diffusion.mixture import ClassMixture, GaussianMixture
from .diffusion.schedule import NoiseSchedule
from .metrics import (
    DigitsClassifier,
    digits_classifier,
    digits_metrics,
    format_metrics,
    frechet_distance,
    toy_metrics,
    within_class_diversity,
)
from .nets.attention import MultiHeadAttention, SpatialTransformer, attention
from .nets.cross_attn_unet import CrossAttnUNet, CrossAttnUNetConfig
from .nets.embeddings import timestep_embedding
from .nets.mlp import MLPDenoiser
from .nets.presets import MODEL_KINDS, PRESETS, build_model, count_parameters, model_kind, preset
from .nets.text import TextEncoder, TextEncoderConfig, Tokenizer, measure_ink, measure_slant
from .nets.unet import UNet
from .nets.vae import VAE, VAEConfig, train_vae
from .pretrained import RECIPES, load_or_train
from .sampling.ddpm_ddim import (
    ddim_invert,
    ddim_sample,
    ddim_sigma,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    ddpm_step,
    ddpm_variances,
)
from .sampling.guidance import cfg_combine, guided_model
from .sampling.registry import SAMPLERS, count_nfe, sample
from .sampling.solvers import dpmpp_2m_sample, euler_ancestral_sample, plms_sample
from .text2img import (
    Text2ImgConfig,
    TextToImage,
    load_or_train_text2img,
    sample_prompt,
    train_text2img,
)
from .training.checkpoint import Checkpoint, load_checkpoint
from .training.config import DiffusionConfig, TrainConfig
from .training.ema import EMA
from .training.losses import diffusion_loss, diffusion_loss_at, min_snr_weight, sample_timesteps
from .training.trainer import Trainer, TrainingDiverged

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
