"""tinyddpm: diffusion models derived step by step, verified against ground truth."""

from .cache import cache_dir
from .clip import ContrastiveObjective, clip_trainer, load_clip, load_or_train_clip, train_clip
from .data.datasets import DATASETS, Dataset, load_dataset, toy_mixture
from .data.images import load_image, make_grid, pixels_to_float, read_pixels, save_grid, to_uint8
from .data.loader import BatchSource, make_batch_source
from .data.stream import IdxStream, ImageFolderStream, StreamingImages
from .diffusion.broadcast import extract
from .diffusion.distances import energy_distance, sliced_wasserstein
from .diffusion.mixture import ClassMixture, GaussianMixture
from .diffusion.schedule import NoiseSchedule
from .interop import export_checkpoint, from_diffusers, prediction_from_diffusers, to_diffusers
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
from .nets.clip import CLIPConfig, TinyCLIP, clip_loss, clip_score, clip_zero_shot_accuracy
from .nets.cross_attn_unet import CrossAttnUNet, CrossAttnUNetConfig
from .nets.embeddings import timestep_embedding
from .nets.mlp import MLPDenoiser
from .nets.presets import MODEL_KINDS, PRESETS, build_model, count_parameters, model_kind, preset
from .nets.text import TextEncoder, TextEncoderConfig, Tokenizer, measure_ink, measure_slant
from .nets.unet import UNet
from .nets.vae import VAE, VAEConfig
from .pretrained import RECIPES, load_or_train
from .sampling.classifier_guidance import classifier_guidance
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
from .sampling.editing import img2img, inpaint
from .sampling.flow import flow_sample
from .sampling.grids import karras_sigmas, log_snr_sigmas
from .sampling.guidance import cfg_combine, guided_model
from .sampling.heun import heun_sample
from .sampling.nfe import format_nfe_table, nfe_table
from .sampling.registry import SAMPLERS, count_nfe, sample
from .sampling.solvers import dpmpp_2m_sample, euler_ancestral_sample, plms_sample
from .text2img import (
    Text2ImgConfig,
    Text2ImgObjective,
    TextToImage,
    is_text2img_checkpoint,
    load_or_train_text2img,
    sample_prompt,
    text2img_trainer,
    train_text2img,
)
from .training.checkpoint import Checkpoint, load_checkpoint
from .training.config import DiffusionConfig, TrainConfig
from .training.continuous import EDMObjective, FlowMatchingObjective, edm_eps_model, flow_velocity_model
from .training.ema import EMA
from .training.losses import diffusion_loss, diffusion_loss_at, min_snr_weight, sample_timesteps
from .training.objectives import ClassificationObjective, DiffusionObjective, ELBOObjective, Objective, train_vae
from .training.trainer import Trainer, TrainingDiverged, TrainingInterrupted

__version__ = "0.1.0"

__all__ = [
    "attention",
    "BatchSource",
    "build_model",
    "cache_dir",
    "cfg_combine",
    "classifier_guidance",
    "Checkpoint",
    "ClassificationObjective",
    "ClassMixture",
    "clip_loss",
    "clip_score",
    "clip_trainer",
    "clip_zero_shot_accuracy",
    "CLIPConfig",
    "count_nfe",
    "count_parameters",
    "ContrastiveObjective",
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
    "DiffusionObjective",
    "digits_classifier",
    "digits_metrics",
    "DigitsClassifier",
    "dpmpp_2m_sample",
    "edm_eps_model",
    "EDMObjective",
    "ELBOObjective",
    "EMA",
    "energy_distance",
    "euler_ancestral_sample",
    "export_checkpoint",
    "extract",
    "flow_sample",
    "flow_velocity_model",
    "FlowMatchingObjective",
    "format_metrics",
    "format_nfe_table",
    "frechet_distance",
    "from_diffusers",
    "GaussianMixture",
    "guided_model",
    "heun_sample",
    "IdxStream",
    "ImageFolderStream",
    "img2img",
    "inpaint",
    "is_text2img_checkpoint",
    "karras_sigmas",
    "load_checkpoint",
    "load_clip",
    "load_dataset",
    "load_image",
    "load_or_train",
    "load_or_train_clip",
    "load_or_train_text2img",
    "log_snr_sigmas",
    "make_batch_source",
    "make_grid",
    "measure_ink",
    "measure_slant",
    "min_snr_weight",
    "MLPDenoiser",
    "model_kind",
    "MODEL_KINDS",
    "MultiHeadAttention",
    "nfe_table",
    "NoiseSchedule",
    "Objective",
    "pixels_to_float",
    "plms_sample",
    "prediction_from_diffusers",
    "preset",
    "PRESETS",
    "read_pixels",
    "RECIPES",
    "sample",
    "sample_prompt",
    "sample_timesteps",
    "SAMPLERS",
    "save_grid",
    "sliced_wasserstein",
    "SpatialTransformer",
    "StreamingImages",
    "text2img_trainer",
    "Text2ImgConfig",
    "Text2ImgObjective",
    "TextEncoder",
    "TextEncoderConfig",
    "TextToImage",
    "timestep_embedding",
    "TinyCLIP",
    "to_diffusers",
    "to_uint8",
    "Tokenizer",
    "toy_metrics",
    "toy_mixture",
    "train_clip",
    "train_text2img",
    "train_vae",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "UNet",
    "VAE",
    "VAEConfig",
    "within_class_diversity",
]
