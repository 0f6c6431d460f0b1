"""The one Trainer with other objectives (VAE, classifier), gradient accumulation, precision and RNG keying."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from tinyddpm.data.datasets import Dataset, load_dataset
from tinyddpm.nets.presets import build_model
from tinyddpm.nets.vae import VAE, VAEConfig
from tinyddpm.training.config import DiffusionConfig, TrainConfig
from tinyddpm.training.objectives import ClassificationObjective, ELBOObjective
from tinyddpm.training.runtime import fused_adamw_supported, resolve_precision, restore_rng_state
from tinyddpm.training.trainer import Trainer

DIFF = DiffusionConfig(T=50)


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=8, lr=2e-3, warmup_steps=0, device="cpu", progress=False, log_every=0,
                ema_decay=0.5, precision="fp32")
    return TrainConfig(**{**base, **kw})


def digits(n: int = 64) -> Dataset:
    d = load_dataset("digits", split="train")
    return Dataset(d.x[:n], d.labels[:n], 10, "digits")


def vae(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(channels=8, beta=0.1))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ the VAE objective
def test_elbo_objective_is_the_vaes_negative_beta_elbo():
    """The Trainer's VAE loss on drawn (rows, ε) equals VAE.loss replaying the same ε by hand."""
    data = digits()
    tr = Trainer(vae(), None, data, cfg(), objective=ELBOObjective())
    batch = tr.next_batch()
    g = torch.Generator().manual_seed(0)             # replay: the batch generator drew the rows first
    idx = torch.randint(len(data), (8,), generator=g)
    assert torch.equal(batch["idx"], idx)
    eps = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(1))   # the noise generator: seed + 1
    assert torch.equal(batch["eps"], eps)
    x = data.x[idx]
    mean, logvar = tr.model.encode(x)
    x_hat = tr.model.decode(mean + (0.5 * logvar).exp() * eps)
    rec = ((x - x_hat) ** 2).sum(dim=(1, 2, 3))
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(tr.objective.loss(tr._net, batch), (rec + 0.1 * kl).mean())


def test_vae_training_resumes_bit_exactly(tmp_path):
    data = digits()
    full = Trainer(vae(), None, data, cfg(), tmp_path / "full", objective=ELBOObjective())
    full.train()
    half = Trainer(vae(), None, data, cfg(), tmp_path / "half", objective=ELBOObjective())
    half.train(3)
    torch.manual_seed(7)
    again = Trainer.resume(tmp_path / "half", data)          # rebuilds the VAE and the objective from config.json
    assert again.step == 3 and isinstance(again.model, VAE) and again.objective.name == "vae_elbo"
    again.train()
    for a, b in ((full.model, again.model), (full.ema_model, again.ema_model)):
        sa, sb = state(a), state(b)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_train_vae_goes_through_the_trainer(tmp_path):
    from tinyddpm.training.checkpoint import load_checkpoint
    from tinyddpm.training.objectives import train_vae

    data, log = digits(), []
    v = train_vae(data, config=VAEConfig(channels=8), steps=3, batch_size=8, out_dir=tmp_path, log=log)
    ck = load_checkpoint(tmp_path, ema=False)
    assert ck.model_kind == "vae" and ck.step == 3 and ck.schedule is None
    assert log and log[0][0] == 0
    raw = state(ck.model)
    assert all(torch.equal(raw[k], v.state_dict()[k]) for k in raw if k != "scale_factor")


# ------------------------------------------------------------------------------ the classifier objective
def test_classification_shift_moves_each_image_by_its_own_offset():
    obj = ClassificationObjective(shift=1, pad_value=-1.0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    shift = torch.tensor([[0, 2], [1, 1]])             # (dy, dx) in 0..2: 1 means no move
    out = obj._shifted(x, shift)
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    for b, (dy, dx) in enumerate(shift.tolist()):
        assert torch.equal(out[b], padded[b, :, dy:dy + 4, dx:dx + 4])
    assert torch.equal(out[1], x[1])


def test_classifier_objective_learns_and_uses_outliers():
    data = digits(256)
    torch.manual_seed(0)
    from tinyddpm.metrics import DigitsClassifier, _noise_images

    model = DigitsClassifier(8, 16)
    obj = ClassificationObjective(outlier_weight=0.5, outliers=_noise_images)
    tr = Trainer(model, None, data, cfg(steps=150, batch_size=32, lr=5e-3), objective=obj)
    batch = tr.next_batch()
    assert batch["outliers"].shape == (32, 1, 8, 8)
    tr.train()
    with torch.no_grad():
        p_data = tr.model.predict_proba(data.x)
        p_noise = tr.model.predict_proba(_noise_images(256, torch.Generator().manual_seed(9)))
    assert float((p_data.argmax(1) == data.labels).float().mean()) > 0.8       # chance: 0.1
    assert float(p_noise.max(1).values.mean()) < float(p_data.max(1).values.mean()) - 0.2
    with pytest.raises(ValueError, match="outliers"):
        ClassificationObjective(outlier_weight=0.5)
    with pytest.raises(ValueError, match="needs a Dataset with labels"):
        Trainer(DigitsClassifier(8, 16), None, Dataset(data.x), cfg(), objective=ClassificationObjective())


# ------------------------------------------------------------------------------ accumulation, precision
def mlp(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("mlp", dict(dim=2, hidden=32, depth=2, time_dim=16, num_classes=8))


def test_gradient_accumulation_matches_one_big_batch():
    """accum_steps=2 with batch 16 (two micro-batches of 8) takes the same steps as batch 16 at once."""
    data = load_dataset("mixture", n=256, seed=0)
    one = Trainer(mlp(), DIFF.build(), data, cfg(batch_size=16, label_dropout=0.2, weighting="min_snr"), None, DIFF)
    two = Trainer(mlp(), DIFF.build(), data, cfg(batch_size=16, accum_steps=2, label_dropout=0.2,
                                                 weighting="min_snr"), None, DIFF)
    h1, h2 = one.train(), two.train()
    torch.testing.assert_close(torch.tensor([r["loss"] for r in h2]), torch.tensor([r["loss"] for r in h1]),
                               rtol=1e-5, atol=1e-6)
    s1, s2 = state(one.model), state(two.model)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-5, atol=1e-6)
    # and it is not trivially equal: a batch of 8 (half the data per step) ends elsewhere
    half = Trainer(mlp(), DIFF.build(), data, cfg(batch_size=8, label_dropout=0.2, weighting="min_snr"), None, DIFF)
    half.train()
    assert not all(torch.allclose(state(half.model)[k], s1[k], atol=1e-6) for k in s1)


def test_precision_resolution_and_bf16_on_cpu():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    with pytest.warns(UserWarning, match="does not support bfloat16; training in fp16 with a GradScaler"):
        p = resolve_precision("bf16", cuda, bf16_supported=False)
    assert (p.name, p.dtype, p.scaler) == ("fp16", torch.float16, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("auto", cuda, bf16_supported=True).dtype == torch.bfloat16
        assert resolve_precision("auto", cpu).dtype is None                # fp32 on CPU unless asked
        assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16.*needs a CUDA GPU"):
        resolve_precision("fp16", cpu)
    data = load_dataset("mixture", n=128, seed=0)
    tr = Trainer(mlp(), DIFF.build(), data, cfg(precision="bf16", steps=3), None, DIFF)
    hist = tr.train()
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    assert tr.scaler is None and fused_adamw_supported(cpu) == tr.optimizer.defaults["fused"]


# ------------------------------------------------------------------------------ RNG states by device type
def test_rng_states_are_keyed_by_device_type_and_never_cross():
    batch, noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    saved_batch = torch.Generator().manual_seed(5).get_state()
    fake_cuda_state = torch.zeros(16, dtype=torch.uint8)   # not a CPU generator state: must never reach one
    state = {"batch": saved_batch, "noise": {"cuda": fake_cuda_state},
             "torch": {"cpu": torch.get_rng_state(), "cuda": [fake_cuda_state]}}
    with pytest.warns(UserWarning, match="saved on cuda and cannot drive a cpu generator: reseeded with 99"):
        lost = restore_rng_state(state, batch, noise, reseed=99)
    assert len(lost) == 1
    assert torch.equal(batch.get_state(), saved_batch)
    assert torch.equal(noise.get_state(), torch.Generator().manual_seed(99).get_state())
    # a matching device type restores exactly and silently; an old (un-keyed) layout reads as CPU
    noise_state = torch.Generator().manual_seed(3).get_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restore_rng_state({**state, "noise": {"cpu": noise_state}}, batch, noise, reseed=0)
        assert torch.equal(noise.get_state(), noise_state)
        restore_rng_state({"batch": saved_batch, "noise": noise_state, "torch": torch.get_rng_state()},
                          batch, noise, reseed=0)
        assert torch.equal(noise.get_state(), noise_state)


def test_checkpoints_save_rng_by_device_type(tmp_path):
    from tinyddpm.training.checkpoint import read_state

    data = load_dataset("mixture", n=64, seed=0)
    Trainer(mlp(), DIFF.build(), data, cfg(steps=2), tmp_path, DIFF).train()
    s = read_state(tmp_path / "step_000002")
    assert set(s["rng"]["noise"]) == {"cpu"} and "cpu" in s["rng"]["torch"] and s["device_type"] == "cpu"


def test_every_parameter_gets_a_gradient_so_ddp_needs_no_unused_parameter_search():
    """A UNet built with a context but trained on plain images: the objective feeds the all-zeros
    (unconditional) context, so no parameter is left without a gradient (DDP would refuse it)."""
    data = digits(32)
    torch.manual_seed(0)
    unet = build_model("unet", dict(in_channels=1, image_size=8, base_channels=8, channel_mults=(1,),
                                    num_res_blocks=1, attention_levels=(), groups=4, context_dim=4))
    tr = Trainer(unet, DIFF.build(), data, cfg(steps=1), None, DIFF)
    tr.train_step()
    missing = [n for n, p in unet.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    # the zero context is the unconditional input: the same prediction as no context at all
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context=torch.zeros(2, 1, 4)), unet(x, t), rtol=0, atol=0)
