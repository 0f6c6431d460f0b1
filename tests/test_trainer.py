"""The Trainer: it learns, resumes bit for bit, stops cleanly on NaN, drops labels, averages weights."""

from __future__ import annotations

import json

import pytest
import torch

import tinyddpm as td
from tinyddpm.data.datasets import Dataset, load_dataset, toy_mixture
from tinyddpm.nets.presets import build_model
from tinyddpm.training.config import DiffusionConfig, TrainConfig
from tinyddpm.training.ema import EMA
from tinyddpm.training.losses import diffusion_loss_at
from tinyddpm.training.trainer import Trainer, TrainingDiverged, config_differences

DIFF = DiffusionConfig(T=50)


@pytest.fixture(scope="module")
def mixture() -> Dataset:
    return load_dataset("mixture", n=512, seed=3)


def mlp(seed: int = 0, num_classes: int | None = None, hidden: int = 32):
    torch.manual_seed(seed)
    return build_model("mlp", dict(dim=2, hidden=hidden, depth=2, time_dim=16, num_classes=num_classes))


def cfg(**kw) -> TrainConfig:
    base = dict(steps=20, batch_size=16, lr=3e-3, warmup_steps=5, device="cpu", progress=False, log_every=5,
                ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


def trainer(data, out=None, *, model=None, resume=False, **kw) -> Trainer:
    return Trainer(model if model is not None else mlp(), DIFF.build(), data, cfg(**kw), out, DIFF, resume=resume)


def fixed_loss(model, data, n: int = 512) -> float:
    """Loss at fixed (t, ε) on the whole set, independent of the trainer's own draws."""
    g = torch.Generator().manual_seed(123)
    t = torch.randint(1, DIFF.T + 1, (n,), generator=g)
    eps = torch.randn(n, 2, generator=g)
    with torch.no_grad():
        return float(diffusion_loss_at(model, DIFF.build(), data.x[:n], t, eps))


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_decreases_towards_the_oracle_on_the_toy_mixture(mixture):
    """Trained loss closes most of the gap between an untrained net and the Bayes-optimal E[ε | x_t]."""
    tr = trainer(mixture, steps=200, batch_size=64, ema_decay=0.95)
    before = fixed_loss(tr.model, mixture)
    hist = tr.train()
    assert len(hist) == 200 and [r["step"] for r in hist[:3]] == [1, 2, 3]
    after_raw, after_ema = fixed_loss(tr.model, mixture), fixed_loss(tr.ema_model, mixture)
    oracle = fixed_loss(lambda x, t: toy_mixture().optimal_eps(x, t, DIFF.build()).float(), mixture)
    assert oracle < after_raw + 0.03 and oracle < after_ema + 0.03  # nothing beats E[ε | x_t] (up to noise)
    assert before - oracle > 0.3
    for after in (after_raw, after_ema):
        assert after - oracle < 0.35 * (before - oracle), (before, after_raw, after_ema, oracle)
    first, last = sum(r["loss"] for r in hist[:20]) / 20, sum(r["loss"] for r in hist[-20:]) / 20
    assert last < 0.8 * first


def test_resume_is_bit_exact_on_cpu(mixture, tmp_path):
    """20 steps straight == 10 steps, checkpoint, a fresh process-like Trainer, 10 more steps."""
    data = load_dataset("mixture", n=256, seed=5)  # labelled: exercise label dropout too
    full = trainer(data, tmp_path / "full", model=mlp(1, num_classes=8), label_dropout=0.3)
    hist_full = full.train()

    half = trainer(data, tmp_path / "half", model=mlp(1, num_classes=8), label_dropout=0.3)
    hist_a = half.train(10)
    torch.manual_seed(999)  # resuming must restore the global RNG too, whatever happened in between
    again = Trainer(mlp(7, num_classes=8), DIFF.build(), data, cfg(label_dropout=0.3), tmp_path / "half", DIFF,
                    resume=True)
    assert again.step == 10
    hist_b = again.train()
    assert [r["loss"] for r in hist_a + hist_b] == [r["loss"] for r in hist_full]
    assert_bit_identical(params(again.model), params(full.model))
    assert_bit_identical(params(again.ema_model), params(full.ema_model))
    # the classmethod rebuilds everything from the run directory alone
    other = Trainer.resume(tmp_path / "half", data, steps=25)
    assert other.step == 20 and other.config.steps == 25
    assert_bit_identical(params(other.model), params(full.model))


def test_resume_with_a_different_config_says_what_differs(mixture, tmp_path):
    trainer(mixture, tmp_path, steps=3).train()
    with pytest.raises(ValueError, match=r"train\.lr: checkpoint has 0\.003, this run has 0\.002"):
        trainer(mixture, tmp_path, steps=3, lr=2e-3, resume=True)
    with pytest.raises(ValueError, match=r"model\.config\.hidden: checkpoint has 32, this run has 16"):
        trainer(mixture, tmp_path, model=mlp(hidden=16), resume=True)
    with pytest.raises(ValueError, match=r"data\.name: checkpoint has 'mixture', this run has 'moons'"):
        trainer(load_dataset("moons", n=512), tmp_path, resume=True)
    # settings that do not shape the weights may change
    t = trainer(mixture, tmp_path, steps=5, log_every=1, keep_last=1, resume=True)
    assert t.step == 3 and len(t.train()) == 2
    with pytest.raises(ValueError, match="resume=True needs the out_dir"):
        trainer(mixture, None, resume=True)


def test_config_differences_lists_nested_leaves():
    d = config_differences({"a": 1, "m": {"h": 2, "k": "x"}}, {"a": 1, "m": {"h": 3, "k": "x"}, "new": 0})
    assert d == ["m.h: checkpoint has 2, this run has 3", "new: checkpoint has '<absent>', this run has 0"]


class NaNAfter(torch.nn.Module):
    """A forward hook that poisons the output from the k-th call on."""

    def __init__(self, k: int):
        super().__init__()
        self.k, self.calls = k, 0

    def __call__(self, module, inputs, output):
        self.calls += 1
        return output * float("nan") if self.calls >= self.k else output


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(mixture, tmp_path):
    tr = trainer(mixture, tmp_path, steps=12, ckpt_every=5)
    tr.model.register_forward_hook(NaNAfter(8))
    match = r"diverged at step 8: loss = nan.*last good checkpoint is .*step_000005"
    with pytest.raises(TrainingDiverged, match=match):
        tr.train()
    assert tr.step == 7  # the poisoned step did not update anything
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    assert (tmp_path / "latest").read_text().strip() == "step_000005"
    ck = td.load_checkpoint(tmp_path, ema=False)
    assert ck.step == 5 and all(torch.isfinite(p).all() for p in ck.model.parameters())


def test_exploding_lr_is_caught(mixture, tmp_path):
    tr = trainer(mixture, tmp_path, steps=30, lr=1e30, warmup_steps=0, grad_clip=0.0, ckpt_every=1)
    with pytest.raises(TrainingDiverged, match="diverged at step"):
        tr.train()
    ck = td.load_checkpoint(tmp_path, ema=False)  # the last checkpoint written is a finite one
    assert ck.step >= 1 and all(torch.isfinite(p).all() for p in ck.model.parameters())


def test_label_dropout_replaces_labels_by_the_null_label_at_rate_p():
    data = load_dataset("mixture", n=400, seed=1)
    tr = trainer(data, model=mlp(num_classes=8), batch_size=400, label_dropout=0.25)
    g = torch.Generator().manual_seed(0)  # replay the trainer's draws: idx, t, then the dropout mask
    ys, null = [], 0
    for _ in range(10):
        idx = torch.randint(400, (400,), generator=g)
        torch.randint(1, DIFF.T + 1, (400,), generator=g)
        drop = torch.rand(400, generator=g) < 0.25
        x0, t, noise, y = tr.objective.inputs(tr.next_batch())
        assert torch.equal(x0, data.x[idx])
        assert torch.equal(y, torch.where(drop, 8, data.labels[idx]))
        ys.append(y)
        null += int((y == 8).sum())
    rate = null / 4000  # binomial(4000, 0.25): sd 0.007
    assert abs(rate - 0.25) < 0.03
    unconditional = trainer(data, batch_size=8)  # labels ignored for an unconditional model
    assert unconditional.objective.inputs(unconditional.next_batch())[3] is None


def test_conditional_model_needs_labels():
    with pytest.raises(ValueError, match="class-conditional.*data has no labels"):
        trainer(Dataset(load_dataset("moons", n=64).x), model=mlp(num_classes=2))


def test_bad_arguments():
    data = load_dataset("moons", n=64)
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        Trainer(mlp(), "linear", data, cfg())
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        Trainer(mlp(), DIFF.build(), data, {"steps": 1})
    with pytest.raises(ValueError, match="diffusion.T = 50 but the schedule has T = 1000"):
        Trainer(mlp(), td.NoiseSchedule.linear(1000), data, cfg(), None, DIFF)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            Trainer(mlp(), DIFF.build(), data, cfg(device="cuda"))


def test_outputs_log_and_samples(tmp_path):
    data = load_dataset("moons", n=128)
    tr = trainer(data, tmp_path, steps=10, log_every=5, sample_every=10, sample_n=32, sample_steps=4)
    tr.train()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5, 10] and all(r["loss"] > 0 for r in log)
    assert (tmp_path / "samples" / "step_000010.png").is_file()
    x = tr.sample(32, steps=4)
    assert x.shape == (32, 2) and torch.isfinite(x).all()


def test_ema_follows_eq_ema():
    """θ̄_n = d θ̄_{n-1} + (1-d) θ_n, checked against the unrolled sum d^n θ̄_0 + Σ_k (1-d) d^{n-k} θ_k."""
    lin = torch.nn.Linear(3, 1)
    ema = EMA(lin, decay=0.8, warmup=False)
    theta0 = lin.weight.detach().clone()
    thetas = []
    for k in range(1, 6):
        with torch.no_grad():
            lin.weight.add_(k * 0.1)
        thetas.append(lin.weight.detach().clone())
        ema.update(lin)
    d, n = 0.8, 5
    expected = d**n * theta0 + sum((1 - d) * d ** (n - k) * thetas[k - 1] for k in range(1, n + 1))
    assert torch.allclose(ema.model.weight, expected, rtol=0, atol=1e-6)
    # warm-up: d_n = min(d, (1 + n) / (10 + n)); the first update uses 1/10
    w = EMA(lin, decay=0.999, warmup=True)
    assert w.current_decay() == pytest.approx(0.1)
    late = EMA(lin, decay=0.5, start=2)
    assert late.current_decay() == 0.0  # before `start`: copy
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\)"):
        EMA(lin, decay=1.0)


def test_few_images_warning_only_for_generative_objectives():
    """Under 500 images a *generative* model memorises its data: the Trainer warns for the diffusion,
    flow and EDM objectives, not for a classifier, the noise-aware classifier, CLIP or the VAE."""
    import warnings

    from tinyddpm.clip import ContrastiveObjective
    from tinyddpm.metrics import DigitsClassifier
    from tinyddpm.nets.clip import CLIPConfig, TinyCLIP
    from tinyddpm.nets.text import TextEncoderConfig
    from tinyddpm.nets.vae import VAE, VAEConfig
    from tinyddpm.training.continuous import EDMObjective, FlowMatchingObjective
    from tinyddpm.training.noisy_classifier import NoisyClassificationObjective, NoisyClassifier

    d = load_dataset("digits", split="train")
    small = Dataset(d.x[:40], d.labels[:40], 10, "digits")
    s = DIFF.build()
    unet = lambda: build_model("unet", dict(in_channels=1, base_channels=8, channel_mults=(1,),  # noqa: E731
                                            attention_levels=(), groups=4))
    clip_cfg = CLIPConfig(width=4, embed_dim=8, text=TextEncoderConfig(0, dim=16, depth=1, heads=2))

    def warns(model, objective) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(model, s, small, cfg(steps=1, batch_size=8, label_dropout=0.0), objective=objective)
        return any("the dataset has only 40 images" in str(w.message) for w in caught)

    assert warns(unet(), td.DiffusionObjective(s))
    assert warns(unet(), FlowMatchingObjective())
    assert warns(unet(), EDMObjective(s))
    assert not warns(NoisyClassifier(width=4, hidden=8), NoisyClassificationObjective(s))
    assert not warns(DigitsClassifier(), td.ClassificationObjective())
    assert not warns(TinyCLIP(clip_cfg), ContrastiveObjective())
    assert not warns(VAE(VAEConfig(channels=8)), td.ELBOObjective())
