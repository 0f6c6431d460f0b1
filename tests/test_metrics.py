"""Quality metrics: the Fréchet distance against closed forms, the digits classifier, and the floors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import tinyddpm.metrics as M
from tinyddpm import (
    GaussianMixture,
    cache_dir,
    digits_classifier,
    digits_metrics,
    format_metrics,
    frechet_distance,
    load_dataset,
    toy_metrics,
    toy_mixture,
)
from tinyddpm.metrics import ClassifierRecipe, frechet_distance_from_stats

F64 = torch.float64


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache for this module: the classifier is trained here once, never in ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("cache")
        mp.setenv("TINYDDPM_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def clf(cache):
    return digits_classifier()


# --- cache_dir -----------------------------------------------------------------------------------


def test_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYDDPM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    assert cache_dir("classifiers") == tmp_path / "c" / "classifiers" and (tmp_path / "c" / "classifiers").is_dir()
    with pytest.raises(ValueError, match="relative folder name"):
        cache_dir("../escape")
    monkeypatch.delenv("TINYDDPM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "tinyddpm"


# --- Fréchet distance ----------------------------------------------------------------------------


def test_frechet_closed_form_diagonal_and_rotated():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, generator=g, dtype=F64) + 0.1, torch.rand(6, generator=g, dtype=F64) + 0.1
    mu_a, mu_b = torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    expected = float(((a.sqrt() - b.sqrt()) ** 2).sum() + ((mu_a - mu_b) ** 2).sum())
    assert math.isclose(frechet_distance_from_stats(mu_a, a.diag(), mu_b, b.diag()), expected, rel_tol=1e-10)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))     # same rotation of both: same FD
    got = frechet_distance_from_stats(q @ mu_a, q @ a.diag() @ q.T, q @ mu_b, q @ b.diag() @ q.T)
    assert math.isclose(got, expected, rel_tol=1e-9)
    # 1-D: (μ1 − μ2)² + (σ1 − σ2)²
    t = torch.tensor
    one_d = frechet_distance_from_stats(t([1.0]), t([[4.0]]), t([3.0]), t([[9.0]]))
    assert math.isclose(one_d, 4.0 + 1.0, rel_tol=1e-12)


def test_frechet_general_matches_scipy_and_rejects_a_naive_formula():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(5, 5, generator=g, dtype=F64), torch.randn(5, 5, generator=g, dtype=F64)
    cov_a, cov_b = A @ A.T + 0.1 * torch.eye(5, dtype=F64), B @ B.T + 0.1 * torch.eye(5, dtype=F64)
    mu = torch.zeros(5, dtype=F64)
    ref = float(np.trace(cov_a.numpy() + cov_b.numpy() - 2 * scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real))
    got = frechet_distance_from_stats(mu, cov_a, mu, cov_b)
    assert math.isclose(got, ref, rel_tol=1e-8)
    # the tempting shortcut tr(Σa + Σb − 2 √Σa √Σb) is only right when Σa, Σb commute: it differs here
    naive = float((cov_a + cov_b - 2 * M._sqrtm_psd(cov_a) @ M._sqrtm_psd(cov_b)).trace())
    assert not math.isclose(naive, got, rel_tol=1e-3)


def _with_exact_moments(z: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Transform samples so their sample mean is exactly mu and unbiased sample covariance exactly cov."""
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T       # sample covariance -> I
    return mu + z @ torch.linalg.cholesky(cov).T


def test_frechet_of_feature_sets():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(4, generator=g, dtype=F64) + 0.2, torch.rand(4, generator=g, dtype=F64) + 0.2
    mu_a, mu_b = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    xa = _with_exact_moments(torch.randn(50, 4, generator=g, dtype=F64), mu_a, a.diag())
    xb = _with_exact_moments(torch.randn(80, 4, generator=g, dtype=F64), mu_b, b.diag())
    expected = float(((a.sqrt() - b.sqrt()) ** 2).sum() + ((mu_a - mu_b) ** 2).sum())
    assert math.isclose(frechet_distance(xa, xb), expected, rel_tol=1e-9)
    assert math.isclose(frechet_distance(xb.float().numpy(), xa.float().numpy()), expected, rel_tol=1e-5)
    assert frechet_distance(xa, xa) < 1e-10
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(xa, xb[:, :3])
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(xa[:1], xb)


# --- the digits classifier -----------------------------------------------------------------------


def test_classifier_accuracy_and_cache(clf, cache, monkeypatch):
    test = load_dataset("digits", split="test")
    acc = float((clf.predict_proba(test.x).argmax(1) == test.labels).double().mean())
    assert acc >= 0.95 and acc == clf.test_accuracy
    files = sorted(p.suffix for p in (cache / "classifiers").iterdir())
    assert files == [".json", ".safetensors"]
    # the second call loads (training is made impossible) and predicts identically
    monkeypatch.setattr(M, "train_digits_classifier", lambda *a, **k: pytest.fail("retrained instead of loading"))
    again = digits_classifier()
    assert torch.equal(again.logits(test.x), clf.logits(test.x)) and again.test_accuracy == clf.test_accuracy
    assert clf.features(test.x).shape == (297, 64)
    assert torch.allclose(clf.predict_proba(test.x).sum(1), torch.ones(297))
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        clf.logits(torch.zeros(3, 64))


def test_classifier_is_deterministic_and_rebuilds_a_bad_cache(cache):
    quick = ClassifierRecipe(epochs=1, seed=3)
    train = load_dataset("digits").subset(slice(0, 256))
    a, b = M.train_digits_classifier(quick, train), M.train_digits_classifier(quick, train)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    first = digits_classifier(recipe=quick)
    key = quick.key(load_dataset("digits"))[:16]
    meta = cache / "classifiers" / f"digits-{key}.json"
    assert json.loads(meta.read_text())["recipe"]["epochs"] == 1            # a different recipe, its own file
    (cache / "classifiers" / f"digits-{key}.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilding the digits classifier"):
        rebuilt = digits_classifier(recipe=quick)
    x = load_dataset("digits", split="test").x
    assert torch.equal(rebuilt.logits(x), first.logits(x))


# --- digits_metrics ------------------------------------------------------------------------------


def test_digits_metrics_real_digits_sit_at_the_floor(clf):
    real = load_dataset("digits", n=300, seed=11)
    m = digits_metrics(real.x, real.labels, classifier=clf)
    assert m["n"] == 300
    assert 0.5 * m["fd_floor"] < m["fd"] < 1.5 * m["fd_floor"]
    assert abs(m["confident"] - m["confident_floor"]) < 0.1 and m["confident_floor"] > 0.8
    assert m["class_accuracy"] > 0.95 and m["class_accuracy_floor"] == pytest.approx(clf.test_accuracy)
    assert len(m["per_class_accuracy"]) == 10 and min(m["per_class_accuracy"]) > 0.8
    wrong = digits_metrics(real.x, (real.labels + 1) % 10, classifier=clf)
    assert wrong["class_accuracy"] < 0.1                           # labels that do not match the digits
    assert math.isnan(digits_metrics(real.x[:5], torch.zeros(5, dtype=torch.long), classifier=clf)
                      ["per_class_accuracy"][3])                  # class never asked for


def test_digits_metrics_noise_and_blur_are_far_from_the_floor(clf):
    g = torch.Generator().manual_seed(0)
    noise = digits_metrics(torch.rand(300, 1, 8, 8, generator=g) * 2 - 1, classifier=clf)
    assert noise["fd"] > 20 * noise["fd_floor"] and noise["confident"] < 0.05
    real = load_dataset("digits", n=300, seed=11).x
    blurred = digits_metrics(F.avg_pool2d(real, 3, 1, 1, count_include_pad=False), classifier=clf)
    assert blurred["fd"] > 10 * blurred["fd_floor"]


def _fd_scipy(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID's formula with scipy's general matrix square root: an independent computation."""
    a, b = a.double().numpy(), b.double().numpy()
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(root))


def test_digits_metrics_against_another_reference(clf):
    """``reference=``: fd is samples vs the reference, fd_floor the held-out test digits vs it. Edits
    that start from test digits look better against the test digits than against an unseen set."""
    test, train = load_dataset("digits", split="test"), load_dataset("digits", split="train")
    g = torch.Generator().manual_seed(0)
    edits = (test.x + 0.05 * torch.randn(test.x.shape, generator=g)).clamp(-1, 1)  # test digits, perturbed
    ref = train.x[:600]
    m = digits_metrics(edits, classifier=clf, reference=ref)
    with torch.no_grad():
        f_e, f_ref, f_test = clf.features(edits), clf.features(ref), clf.features(test.x)
    assert m["fd"] == pytest.approx(_fd_scipy(f_e, f_ref), rel=1e-4)
    assert m["fd_floor"] == pytest.approx(_fd_scipy(f_test, f_ref), rel=1e-4)
    biased = digits_metrics(edits, classifier=clf)
    assert biased["fd"] == pytest.approx(_fd_scipy(f_e, f_test), rel=1e-4)
    # against their own source the edits beat real digits by far (biased low); against the unseen
    # reference they sit near its real floor
    assert biased["fd"] < 0.5 * biased["fd_floor"] and 0.5 * m["fd_floor"] < m["fd"] < 2 * m["fd_floor"]
    with pytest.raises(ValueError, match="contains held-out test digits"):
        digits_metrics(edits, classifier=clf, reference=torch.cat([ref, test.x[5:6]]))
    with pytest.raises(ValueError, match=r"reference must be finite digits of shape \(M, 1, 8, 8\)"):
        digits_metrics(edits, classifier=clf, reference=ref[:, :, :4])
    with pytest.raises(ValueError, match="reference must be finite"):
        digits_metrics(edits, classifier=clf, reference=torch.full((4, 1, 8, 8), math.nan))


def test_digits_metrics_validation(clf):
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        digits_metrics(torch.zeros(4, 1, 28, 28), classifier=clf)
    with pytest.raises(ValueError, match="values 0..9"):
        digits_metrics(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 10]), classifier=clf)
    with pytest.raises(ValueError, match=r"confidence must lie in \(0, 1\]"):
        digits_metrics(torch.zeros(4, 1, 8, 8), classifier=clf, confidence=1.5)


# --- 2-D metrics ---------------------------------------------------------------------------------


def test_toy_metrics_against_the_mixture():
    gm = toy_mixture()
    good = gm.sample(1000, generator=torch.Generator().manual_seed(5))
    m = toy_metrics(good, gm)
    assert m["n"] == 1000
    assert abs(m["energy"]) < 3 * abs(m["energy_floor"]) + 2e-3 and m["sliced_w"] < 2 * m["sliced_w_floor"]
    assert abs(m["log_likelihood"] - m["log_likelihood_real"]) < 0.1
    assert m["weights_tv"] < 0.05 and m["weights_tv_floor"] < 0.05
    # equal weights instead of the true unequal ones: same support, wrong proportions
    flat = GaussianMixture(gm.means, gm.stds, None).sample(1000, generator=torch.Generator().manual_seed(5))
    bad = toy_metrics(flat, gm)
    assert bad["weights_tv"] > 0.1 and bad["energy"] > 5 * abs(bad["energy_floor"])
    # too wide: log-likelihood under the true mixture drops
    wide = GaussianMixture(gm.means, 2 * gm.stds, gm.weights).sample(1000, generator=torch.Generator().manual_seed(5))
    assert toy_metrics(wide, gm)["log_likelihood"] < m["log_likelihood_real"] - 0.5


def test_toy_metrics_against_a_point_cloud():
    pool = load_dataset("moons", n=4000, seed=0)
    same = toy_metrics(load_dataset("moons", n=1000, seed=1).x, pool)
    other = toy_metrics(load_dataset("swiss_roll", n=1000, seed=1).x, pool)
    assert same["n"] == 1000 and "log_likelihood" not in same
    assert same["energy"] < 3 * abs(same["energy_floor"]) + 5e-3 and other["energy"] > 20 * abs(other["energy_floor"])
    assert other["sliced_w"] > 3 * other["sliced_w_floor"]
    assert toy_metrics(pool.x[:500], pool.x)["n"] == 500
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        toy_metrics(torch.zeros(10, 3), pool)


def test_format_metrics():
    assert format_metrics({"fd": 3.2134, "fd_floor": 1.0512}) == "fd 3.21 (real-vs-real floor 1.05)"
    text = format_metrics({"n": 10, "log_likelihood": -2.345, "log_likelihood_real": -2.3, "per_class": [1.0, 0.5]},
                          sep="; ")
    assert text == "n 10; log_likelihood -2.35 (real data -2.3); per_class [1 0.5]"


def test_within_class_diversity_is_the_mean_of_per_class_mean_pairwise_distances():
    class Flatten:  # stands in for the classifier: features = the pixels themselves
        def features(self, x):
            return x.flatten(1)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 1, 8, 8, generator=g) * 2 - 1
    y = torch.tensor([0, 0, 0, 4, 4, 4, 4])
    # by hand: every unordered pair within a class, in numpy
    f = x.flatten(1).double().numpy()

    def mean_pair(idx):
        d = [np.linalg.norm(f[i] - f[j]) for a, i in enumerate(idx) for j in idx[a + 1:]]
        return sum(d) / len(d)
    expected = (mean_pair([0, 1, 2]) + mean_pair([3, 4, 5, 6])) / 2
    assert M.within_class_diversity(x, y, classifier=Flatten()) == pytest.approx(expected, rel=1e-12)
    # identical samples have no diversity; half the spread (images stay in [-1, 1]) is half the diversity
    assert M.within_class_diversity(x[:1].expand(4, 1, 8, 8), torch.tensor([1, 1, 2, 2]), classifier=Flatten()) == 0
    assert M.within_class_diversity(0.5 * x, y, classifier=Flatten()) == pytest.approx(0.5 * expected, rel=1e-12)
    with pytest.raises(ValueError, match="at least two samples"):
        M.within_class_diversity(x[:3], torch.tensor([0, 0, 1]), classifier=Flatten())
    with pytest.raises(ValueError, match="one label per sample"):
        M.within_class_diversity(x, y[:3], classifier=Flatten())
