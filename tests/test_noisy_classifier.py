"""The noise-aware classifier p_φ(y | x_t, t) for classifier guidance (tinyddpm.training.noisy_classifier).

Ground truth: central finite differences of the classifier's own log-probability for the gradient;
the digits' held-out labels for accuracy; and, for guided sampling, a Gaussian mixture on 8×8 images
(one component per digit class, centred on that class's mean digit) whose exact class posterior
measures what the guided oracle sampler produced."""

from __future__ import annotations

import pytest
import torch

import tinyddpm as td
from tinyddpm.training.noisy_classifier import (
    NoisyClassificationObjective,
    NoisyClassifier,
    classifier_grad_fn,
    noisy_accuracy,
    train_noisy_classifier,
)

F64 = torch.float64
COSINE = td.NoiseSchedule.cosine(1000)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits_clf():
    train = td.load_dataset("digits", split="train")
    log: list = []
    clf = train_noisy_classifier(train, COSINE, steps=200, seed=0, batch_size=64, log=log)
    return clf, log


def test_gradient_is_the_gradient_of_log_p():
    """∇_{x_t} log p_φ(y | x_t, t) against central differences, in float64, per row and with per-row labels."""
    torch.manual_seed(3)
    clf = NoisyClassifier(width=8, hidden=16).double().eval().requires_grad_(False)
    x = torch.randn(3, 1, 8, 8, generator=gen(1), dtype=F64)
    t = torch.tensor([5, 400, 950])
    y = torch.tensor([2, 7, 0])
    g = classifier_grad_fn(clf, y)(x, t)
    assert g.shape == x.shape and g.dtype == F64

    def log_p(xx: torch.Tensor) -> torch.Tensor:            # (3,): each row's log p(y_i | x_i)
        return clf(xx, t).log_softmax(-1).gather(1, y[:, None])[:, 0]

    h = 1e-6
    fd = torch.empty_like(x)
    for j in range(64):
        e = torch.zeros(64, dtype=F64)
        e[j] = h
        e = e.view(1, 1, 8, 8)
        fd.view(3, 64)[:, j] = (log_p(x + e) - log_p(x - e)) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)
    assert float(g.abs().max()) > 1e-3                         # not trivially zero
    # one label for the whole batch, a scalar t, and a fractional t all work
    g7 = classifier_grad_fn(clf, 7)(x, 400)
    torch.testing.assert_close(g7[1], g[1])
    assert torch.isfinite(classifier_grad_fn(clf, 1)(x, torch.tensor([3.5, 400.25, 999.9], dtype=F64))).all()
    # works inside the samplers' no_grad and leaves the input alone
    with torch.no_grad():
        assert torch.equal(classifier_grad_fn(clf, y)(x, t), g)
    assert not x.requires_grad


def test_short_training_beats_chance_at_small_t(digits_clf):
    clf, log = digits_clf
    test = td.load_dataset("digits", split="test")
    acc = {t: noisy_accuracy(clf, test.x, test.labels, COSINE, t, gen(5)) for t in (10, 300, 950)}
    assert acc[10] > 0.85 and acc[300] > 0.7, acc            # chance is 0.1
    assert acc[950] < acc[10]                                # noise hides the label
    assert log and log[-1][1] < log[0][1]
    assert not any(p.requires_grad for p in clf.parameters()) and not clf.training


def test_training_is_deterministic():
    data = td.load_dataset("digits", split="train")
    small = td.Dataset(data.x[:200], data.labels[:200], num_classes=10)
    a = train_noisy_classifier(small, COSINE, steps=5, seed=3, batch_size=32)
    b = train_noisy_classifier(small, COSINE, steps=5, seed=3, batch_size=32)
    c = train_noisy_classifier(small, COSINE, steps=5, seed=4, batch_size=32)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def _digit_mixture() -> td.ClassMixture:
    """Ten 64-D Gaussians, one per digit, centred at 0.6 × that digit's mean training image, std 0.15."""
    data = td.load_dataset("digits", split="train")
    means = torch.stack([data.x[data.labels == c].mean(0).flatten() for c in range(10)]) * 0.6
    return td.ClassMixture(td.GaussianMixture(means, 0.15), list(range(10)))


def test_guidance_with_a_trained_classifier_steers_the_oracle():
    """An unconditional oracle sampler guided by a *trained* p_φ(y | x_t, t) lands in class y: measured by
    the mixture's exact class posterior, the fraction of class 3 rises from its prior 0.1 to most samples."""
    cm, s = _digit_mixture(), COSINE
    gm = cm.mixture
    x = gm.sample(4000, generator=gen(10), return_labels=True)
    data = td.Dataset(x[0].clamp(-1, 1).view(-1, 1, 8, 8), x[1], num_classes=10)
    clf = train_noisy_classifier(data, s, steps=150, seed=0, batch_size=64)
    as_images = lambda f: lambda xt, t: f(xt.flatten(1), t).view_as(xt)  # noqa: E731  (B, 64) <-> (B, 1, 8, 8)
    oracle = as_images(gm.as_model(s))
    frac, log_p = {}, {}
    for w in (0.0, 2.0):
        guided = td.classifier_guidance(oracle, s, classifier_grad_fn(clf, 3), w)
        # clip_x0 (the default for image checkpoints): at t = T the cosine schedule's ᾱ_T ≈ 2e-9, and a trained
        # classifier's gradient there, unlike the exact one (∝ √ᾱ_T), would be divided by √ᾱ_T in x̂_0
        out = td.ddim_sample(guided, s, (200, 1, 8, 8), steps=20, generator=gen(11), clip_x0=True)
        frac[w] = float((cm.class_log_probs(out.flatten(1)).argmax(1) == 3).double().mean())
        log_p[w] = float(gm.log_prob(out.flatten(1)).mean())
    assert frac[0.0] < 0.25 and frac[2.0] > 0.8, frac
    assert min(log_p.values()) > 0, log_p        # on the data: fresh draws score about 28 (off it: < -1000)
    # and the exact gradient does the same at w = 1 (sanity of the set-up, not of the classifier)
    exact = td.classifier_guidance(oracle, s, as_images(cm.class_log_prob_grad(3, s)), 1.0)
    out = td.ddim_sample(exact, s, (200, 1, 8, 8), steps=20, generator=gen(11))
    assert float((cm.class_log_probs(out.flatten(1)).argmax(1) == 3).double().mean()) > 0.95


@pytest.mark.filterwarnings("ignore:the dataset has only")
def test_objective_draws_and_loss():
    data = td.load_dataset("digits", split="train")
    small = td.Dataset(data.x[:64], data.labels[:64], num_classes=10)
    obj = NoisyClassificationObjective(COSINE)
    trainer = td.Trainer(NoisyClassifier(width=4, hidden=8), None, small,
                         td.TrainConfig(steps=1, batch_size=16, device="cpu", progress=False, log_every=0,
                                        label_dropout=0.0), objective=obj)
    batch = obj.draw(16, gen(0), gen(1))
    assert set(batch) == {"idx", "t", "noise"} and int(batch["t"].min()) >= 1 and int(batch["t"].max()) <= 1000
    # the loss is the cross-entropy at x_t = √ᾱ x_0 + √(1-ᾱ) ε, computed here by hand
    net = trainer.model
    x0 = small.x[batch["idx"]]
    ab = COSINE.alpha_bars[batch["t"]].float().view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * batch["noise"]
    expected = torch.nn.functional.cross_entropy(net(xt, batch["t"]), small.labels[batch["idx"]])
    torch.testing.assert_close(obj.loss(net, batch), expected, rtol=1e-5, atol=1e-6)
    assert obj.to_dict() == {"name": "noisy_classification", "T": 1000}


def test_checkpoint_round_trip_and_resume(tmp_path):
    """Kind "noisy-classifier": a run directory loads through load_checkpoint with the same logits and
    guidance gradient, and Trainer.resume rebuilds it (the objective passed: it holds a schedule)."""
    data = td.load_dataset("digits", split="train")
    small = td.Dataset(data.x[:64], data.labels[:64], num_classes=10)
    kw = dict(steps=4, seed=0, batch_size=16, width=4, hidden=8)
    clf = train_noisy_classifier(small, COSINE, out_dir=tmp_path / "a", **kw)
    ck = td.load_checkpoint(tmp_path / "a")
    assert ck.model_kind == "noisy-classifier" and isinstance(ck.model, NoisyClassifier) and ck.step == 4
    assert ck.model.to_config() == clf.to_config()
    x, t = torch.randn(8, 1, 8, 8, generator=gen(40)), torch.tensor([1, 10, 100, 200, 400, 600, 800, 1000])
    assert torch.equal(ck.model(x, t), clf(x, t))
    torch.testing.assert_close(classifier_grad_fn(ck.model, 3)(x, t), classifier_grad_fn(clf, 3)(x, t))
    trainer = td.Trainer.resume(tmp_path / "a", small, objective=NoisyClassificationObjective(COSINE))
    assert trainer.step == 4 and isinstance(trainer.model, NoisyClassifier)
    for k, v in clf.state_dict().items():
        assert torch.equal(trainer.ema_model.state_dict()[k], v), k


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_matches_cpu():
    """Training runs on CUDA, and the gradient of a CUDA classifier equals the CPU one (same weights)."""
    data = td.load_dataset("digits", split="train")
    clf = train_noisy_classifier(data, COSINE, steps=20, seed=0, batch_size=64, device="cuda")
    assert next(clf.parameters()).device.type == "cuda"
    x = torch.randn(8, 1, 8, 8, generator=gen(30))
    t = torch.tensor([1, 100, 200, 300, 400, 500, 700, 999])
    g_cuda = classifier_grad_fn(clf, 4)(x.cuda(), t.cuda())
    g_cpu = classifier_grad_fn(clf.cpu(), 4)(x, t)
    assert g_cuda.device.type == "cuda"
    torch.testing.assert_close(g_cuda.cpu(), g_cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.filterwarnings("ignore:the dataset has only")
def test_validation_errors():
    clf = NoisyClassifier(width=4, hidden=8)
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="y must lie"):
        classifier_grad_fn(clf, 10)
    with pytest.raises(ValueError, match="y must lie"):
        classifier_grad_fn(clf, -1)
    with pytest.raises(TypeError, match="y must be"):
        classifier_grad_fn(clf, 0.5)
    with pytest.raises(TypeError, match="y must be"):
        classifier_grad_fn(clf, True)
    with pytest.raises(TypeError, match="classifier must be"):
        classifier_grad_fn(lambda x, t: x, 1)
    with pytest.raises(ValueError, match="labels for a batch"):
        classifier_grad_fn(clf, torch.tensor([1, 2, 3]))(x, 5)
    with pytest.raises(ValueError, match="x must have shape"):
        clf(torch.zeros(2, 64), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must be a scalar"):
        clf(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="even"):
        NoisyClassifier(image_size=7)
    with pytest.raises(TypeError, match="schedule"):
        NoisyClassificationObjective("cosine")
    with pytest.raises(TypeError, match="labelled image Dataset"):
        train_noisy_classifier(torch.zeros(4, 1, 8, 8), COSINE, steps=1)
    with pytest.raises(TypeError, match="labelled image Dataset"):
        train_noisy_classifier(td.Dataset(torch.zeros(4, 1, 8, 8)), COSINE, steps=1)
    with pytest.raises(ValueError, match="steps"):
        train_noisy_classifier(td.load_dataset("digits", split="test"), COSINE, steps=0)
    with pytest.raises(ValueError, match="a classification objective needs"):
        td.Trainer(clf, None, td.Dataset(torch.zeros(4, 1, 8, 8)),
                   td.TrainConfig(steps=1, batch_size=2, device="cpu", progress=False),
                   objective=NoisyClassificationObjective(COSINE))
