"""Sample quality without downloaded weights: a Fréchet distance on a small digits classifier, its
confidence and class accuracy, and exact 2-D distances, each reported beside its real-vs-real floor.

A metric means little alone: a Fréchet distance of 3 is good if two sets of *real* digits of the same
size are 2 apart, and bad if they are 0.2 apart. So every value comes with the same quantity measured
on real data (``*_floor``, or ``*_real`` where higher is better).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .atomic import write_file_atomic, write_text_atomic
from .cache import cache_dir
from .checks import check_int, check_nonneg_float
from .data.datasets import Dataset, load_dataset
from .diffusion.distances import energy_distance, sliced_wasserstein
from .diffusion.mixture import GaussianMixture

F64 = torch.float64
# bump when the training code below changes, so stale cached weights are not reused
# (3: trained by the one Trainer with ClassificationObjective)
_RECIPE_VERSION = 3


# --- Fréchet distance ----------------------------------------------------------------------------

def _sqrtm_psd(a: Tensor) -> Tensor:
    """Symmetric PSD square root via an eigendecomposition (negative rounding noise clipped to 0)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance_from_stats(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(μ_a, Σ_a) and N(μ_b, Σ_b) (Dowson & Landau 1982)::

        d² = |μ_a − μ_b|² + tr Σ_a + tr Σ_b − 2 tr (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}.

    The last trace equals tr (Σ_a Σ_b)^{1/2}; the symmetric form keeps it an eigenvalue problem of a
    PSD matrix, so it is computed stably in float64 with no complex round-off.
    """
    mu_a, mu_b, cov_a, cov_b = (torch.as_tensor(v, dtype=F64) for v in (mu_a, mu_b, cov_a, cov_b))
    d = mu_a.shape[0]
    if mu_a.shape != (d,) or mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(f"expected means (D,) and covariances (D, D); got {tuple(mu_a.shape)}, "
                         f"{tuple(cov_a.shape)}, {tuple(mu_b.shape)}, {tuple(cov_b.shape)}")
    s = _sqrtm_psd(cov_a)
    m = s @ cov_b @ s
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d2 = ((mu_a - mu_b) ** 2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt
    return max(float(d2), 0.0)  # ≥ 0 mathematically; only rounding can push it below


def _features(x: Tensor | np.ndarray, name: str) -> Tensor:
    x = torch.as_tensor(x).detach().cpu().to(F64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must have shape (N, D) with N >= 2 samples; got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D): the FID formula
    (Heusel et al. 2017) on our own features. Covariances are unbiased (divide by N − 1)."""
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    return frechet_distance_from_stats(a.mean(0), torch.cov(a.T).reshape(a.shape[1], -1),
                                       b.mean(0), torch.cov(b.T).reshape(b.shape[1], -1))


# --- the digits classifier -----------------------------------------------------------------------

@dataclass(frozen=True)
class ClassifierRecipe:
    """How the digits classifier is trained; its hash names the cached weights."""

    width: int = 16            # conv channels: width, then 2·width
    features: int = 64         # size of the penultimate layer used for the Fréchet distance
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3           # AdamW, cosine-decayed to 0
    weight_decay: float = 0.01
    outlier_weight: float = 0.5  # outlier exposure: noise images are pushed toward the uniform prediction
    seed: int = 0

    def key(self, train: Dataset) -> str:
        """sha256 of the recipe, the code version and the training data."""
        h = hashlib.sha256(json.dumps({**asdict(self), "version": _RECIPE_VERSION}, sort_keys=True).encode())
        h.update(train.x.numpy().tobytes())
        h.update(train.labels.numpy().tobytes())
        return h.hexdigest()


class DigitsClassifier(nn.Module):
    """A small CNN for (N, 1, 8, 8) digits in [-1, 1]: two 3×3 convs, 2×2 pool, ``features`` ReLU units, 10 logits."""

    def __init__(self, width: int = 16, features: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),               # (N, w, 8, 8)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),       # (N, 2w, 8, 8)
            nn.MaxPool2d(2), nn.Flatten(),                              # (N, 2w·16)
            nn.Linear(2 * width * 16, features), nn.ReLU(),             # (N, features)
        )
        self.head = nn.Linear(features, 10)
        self.width, self.n_features = width, features
        self.test_accuracy: float | None = None
        self.recipe: ClassifierRecipe | None = None

    def _input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"digits must have shape (N, 1, 8, 8) in [-1, 1]; got {got}")
        return x.to(device=self.head.weight.device, dtype=torch.float32)

    def features(self, x: Tensor) -> Tensor:
        """The penultimate layer (N, features): what the Fréchet distance compares."""
        return self.body(self._input(x))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    forward = logits

    def to_config(self) -> dict[str, int]:
        """Constructor arguments (checkpoint kind "digits-classifier")."""
        return {"width": self.width, "features": self.n_features}

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities (N, 10)."""
        return self.logits(x).softmax(-1)


def _noise_images(n: int, g: torch.Generator) -> Tensor:
    """Outliers for training: uniform, 2×2-smoothed uniform and clipped Gaussian noise images, in thirds."""
    u = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    smooth = F.interpolate(F.avg_pool2d(u, 2) * 2, scale_factor=2, mode="bilinear").clamp(-1, 1)
    gauss = torch.randn(n, 1, 8, 8, generator=g).clamp(-1, 1)
    kind = torch.randint(0, 3, (n, 1, 1, 1), generator=g)
    return torch.where(kind == 0, u, torch.where(kind == 1, smooth, gauss))


def train_digits_classifier(recipe: ClassifierRecipe = ClassifierRecipe(),
                            train: Dataset | None = None) -> DigitsClassifier:
    """Train the classifier on the digits train split with the one Trainer: deterministic for a recipe
    (one CPU thread).

    :class:`~tinyddpm.training.objectives.ClassificationObjective`: cross-entropy on the digits, each
    shifted by up to one pixel, plus ``outlier_weight`` × the cross-entropy from the uniform
    distribution on noise images (outlier exposure, Hendrycks et al. 2019), so that noise is not
    labelled confidently. AdamW with a cosine-decayed lr for ``epochs`` × ⌈N / batch_size⌉ steps.
    """
    from .training.config import TrainConfig
    from .training.objectives import ClassificationObjective
    from .training.trainer import Trainer

    train = load_dataset("digits", split="train") if train is None else train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny layers: one thread is fastest, and makes the result reproducible
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)                    # layer initialisation only
            model = DigitsClassifier(recipe.width, recipe.features)
        config = TrainConfig(
            steps=recipe.epochs * math.ceil(len(train) / recipe.batch_size), batch_size=recipe.batch_size,
            lr=recipe.lr, warmup_steps=0, lr_schedule="cosine", weight_decay=recipe.weight_decay, grad_clip=0.0,
            seed=recipe.seed, device="cpu", precision="fp32", label_dropout=0.0, log_every=0, progress=False)
        objective = ClassificationObjective(shift=1, pad_value=-1.0, outlier_weight=recipe.outlier_weight,
                                            outliers=_noise_images)
        trainer = Trainer(model, None, train, config, objective=objective)
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    model = trainer.model
    model.recipe = recipe
    return model.eval().requires_grad_(False)


def _accuracy(clf: DigitsClassifier, data: Dataset) -> float:
    return float((clf.predict_proba(data.x).argmax(1).cpu() == data.labels).double().mean())


def digits_classifier(device: str | torch.device = "cpu", *, recipe: ClassifierRecipe = ClassifierRecipe(),
                      retrain: bool = False) -> DigitsClassifier:
    """The digits classifier for metrics: trained once (seconds), then loaded from ``cache_dir("classifiers")``.

    Weights are a safetensors file and the recipe a JSON file holding its hash, so loading never
    executes code; a cache entry that does not match the recipe or fails to load is rebuilt.
    ``.test_accuracy`` is its accuracy on the 297 held-out test digits.
    """
    train = load_dataset("digits", split="train")
    key = recipe.key(train)
    folder = cache_dir("classifiers")
    weights, meta = folder / f"digits-{key[:16]}.safetensors", folder / f"digits-{key[:16]}.json"
    model = DigitsClassifier(recipe.width, recipe.features)
    if not retrain and weights.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
            if info.get("hash") != key:
                raise ValueError("recipe hash differs")
            model.load_state_dict(load_file(weights))
            model.recipe, model.test_accuracy = recipe, float(info["test_accuracy"])
            return model.eval().requires_grad_(False).to(device)
        except Exception as e:  # a damaged or foreign cache entry is rebuilt, never trusted
            warnings.warn(f"rebuilding the digits classifier: cached {weights.name} unusable ({e})", stacklevel=2)
    model = train_digits_classifier(recipe, train)
    model.test_accuracy = _accuracy(model, load_dataset("digits", split="test"))
    # atomic: a reader never sees half a file; the weights first, so a meta file always has its weights
    write_file_atomic(weights, lambda p: save_file(model.state_dict(), str(p)))
    write_text_atomic(meta, json.dumps({"hash": key, "recipe": asdict(recipe), "version": _RECIPE_VERSION,
                                        "test_accuracy": model.test_accuracy}, indent=1))
    return model.to(device)


# --- metrics -------------------------------------------------------------------------------------

def _check_points(x: Tensor, name: str, d: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] < 2 or (d is not None and x.shape[1] != d):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (N, {d or 'D'}) with N >= 2; got {got}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.detach().cpu().to(F64)


def digits_metrics(samples: Tensor, labels: Tensor | None = None, *, classifier: DigitsClassifier | None = None,
                   confidence: float = 0.9, seed: int = 0, reference: Tensor | None = None) -> dict:
    """Quality of generated digits (N, 1, 8, 8) in [-1, 1] (clipped to it), each beside its real floor.

    - ``fd``: Fréchet distance of classifier features, samples vs the 297 held-out test digits;
      ``fd_floor``: the same for min(N, 1500) real train digits (drawn with ``seed``) vs the test digits.
      With ``reference`` (M, 1, 8, 8) images, M ≥ 2: ``fd`` is samples vs ``reference`` and ``fd_floor``
      the held-out test digits vs ``reference``. For edits *of test digits*, FD against the test
      digits is biased low (the edits start from them): pass e.g. the training digits. A reference
      that contains a test digit is refused (its floor would be biased low the same way).
    - ``confident``: fraction of samples whose top class probability is ≥ ``confidence``;
      ``confident_floor``: the same on the test digits.
    - with ``labels`` (the classes asked for): ``class_accuracy`` and ``per_class_accuracy`` (10 values,
      NaN for a class never asked for), floors = the classifier's accuracy on the test digits.
    """
    if not isinstance(samples, Tensor) or samples.ndim != 4 or tuple(samples.shape[1:]) != (1, 8, 8) \
            or samples.shape[0] < 2:
        got = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"samples must be digits of shape (N, 1, 8, 8) with N >= 2; got {got}")
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain NaN or infinite values")
    confidence = check_nonneg_float("confidence", confidence)
    if not 0 < confidence <= 1:
        raise ValueError(f"confidence must lie in (0, 1]; got {confidence}")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != (samples.shape[0],)
                               or labels.is_floating_point() or int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError(f"labels must be an integer tensor (N,) = ({samples.shape[0]},) with values 0..9")
    test, train = load_dataset("digits", split="test"), load_dataset("digits", split="train")
    if reference is not None:
        if not isinstance(reference, Tensor) or reference.ndim != 4 or tuple(reference.shape[1:]) != (1, 8, 8) \
                or reference.shape[0] < 2 or not torch.isfinite(reference).all():
            got = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
            raise ValueError(f"reference must be finite digits of shape (M, 1, 8, 8) with M >= 2; got {got}")
        r, t = reference.detach().float().cpu().flatten(1), test.x.float().flatten(1)
        if any(bool((t == row).all(1).any()) for row in r):
            raise ValueError("reference contains held-out test digits, against which fd_floor is measured; "
                             "pass images disjoint from the test split (e.g. the training digits)")
    clf = digits_classifier() if classifier is None else classifier
    x = samples.detach().float().clamp(-1, 1)
    n = x.shape[0]
    if reference is None:        # reference: the test digits; real floor set: min(N, 1500) train digits
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        ref, real = test.x, train.x[perm[: min(n, len(train))]]
    else:                        # reference: the given images; real floor set: the test digits
        ref, real = reference.detach().float().clamp(-1, 1), test.x
    with torch.no_grad():
        f_x, f_ref, f_real = clf.features(x).cpu(), clf.features(ref).cpu(), clf.features(real).cpu()
    p_x, p_test = clf.predict_proba(x).cpu(), clf.predict_proba(test.x).cpu()
    out = {
        "n": n,
        "fd": frechet_distance(f_x, f_ref),
        "fd_floor": frechet_distance(f_real, f_ref),
        "confident": float((p_x.max(1).values >= confidence).double().mean()),
        "confident_floor": float((p_test.max(1).values >= confidence).double().mean()),
    }
    if labels is not None:
        labels = labels.cpu().long()

        def per_class(pred: Tensor, y: Tensor) -> list[float]:
            return [float((pred[y == c] == c).double().mean()) if (y == c).any() else math.nan for c in range(10)]

        out["class_accuracy"] = float((p_x.argmax(1) == labels).double().mean())
        out["class_accuracy_floor"] = float((p_test.argmax(1) == test.labels).double().mean())
        out["per_class_accuracy"] = per_class(p_x.argmax(1), labels)
        out["per_class_accuracy_floor"] = per_class(p_test.argmax(1), test.labels)
    return out


def within_class_diversity(samples: Tensor, labels: Tensor, *, classifier: DigitsClassifier | None = None) -> float:
    """Mean over the classes present of the mean pairwise L2 distance between classifier features.

    The spread that guidance trades for accuracy (chapter 8): samples (N, 1, 8, 8) in [-1, 1] with
    their labels (N,); every class present needs at least two samples. Compare with the same number
    on real digits, e.g. ``within_class_diversity(test.x, test.labels)``.
    """
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point() \
            or not isinstance(samples, Tensor) or samples.shape[0] != labels.shape[0]:
        raise ValueError("labels must be an integer tensor (N,) with one label per sample")
    classes, counts = labels.unique(return_counts=True)
    if (counts < 2).any():
        few = {k: n for k, n in zip(classes.tolist(), counts.tolist(), strict=True) if n < 2}
        raise ValueError(f"every class needs at least two samples; these have fewer (class: count): {few}")
    clf = digits_classifier() if classifier is None else classifier
    with torch.no_grad():
        f = clf.features(samples.detach().float().clamp(-1, 1)).double().cpu()
    labels = labels.cpu()
    return sum(float(torch.pdist(f[labels == k]).mean()) for k in classes.tolist()) / len(classes)


def toy_metrics(samples: Tensor, reference: Tensor | Dataset | GaussianMixture, seed: int = 0,
                n_projections: int = 256) -> dict:
    """Quality of 2-D samples (N, D) against a reference law, each beside its real-vs-real floor.

    ``reference`` is a :class:`GaussianMixture` (two fresh draws of N points: one to compare with,
    one for the floor) or a pool of real points (split in two halves; samples subsampled to match).
    Returns ``energy`` (energy distance) and ``sliced_w`` (sliced 2-Wasserstein, same projections for
    value and floor), and for a mixture ``log_likelihood`` (mean log p under the true mixture) beside
    ``log_likelihood_real`` (fresh data), and ``weights_tv`` (total variation between the fraction of
    points nearest each component and the true weights).
    """
    check_int("seed", seed)
    g = torch.Generator().manual_seed(seed)
    if isinstance(reference, GaussianMixture):
        x = _check_points(samples, "samples", reference.D)
        real_a = reference.sample(x.shape[0], generator=g).to(F64)
        real_b = reference.sample(x.shape[0], generator=g).to(F64)
    else:
        pool = _check_points(reference.x if isinstance(reference, Dataset) else reference, "reference")
        x = _check_points(samples, "samples", pool.shape[1])
        n = min(x.shape[0], pool.shape[0] // 2)
        if n < 2:
            raise ValueError(f"reference needs at least 4 points to be split in two; got {pool.shape[0]}")
        order = torch.randperm(pool.shape[0], generator=g)
        real_a, real_b = pool[order[:n]], pool[order[n:2 * n]]
        x = x[torch.randperm(x.shape[0], generator=g)[:n]]
    sw_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    out = {
        "n": x.shape[0],
        "energy": energy_distance(x, real_a),
        "energy_floor": energy_distance(real_b, real_a),
        "sliced_w": sliced_wasserstein(x, real_a, n_projections, torch.Generator().manual_seed(sw_seed)),
        "sliced_w_floor": sliced_wasserstein(real_b, real_a, n_projections, torch.Generator().manual_seed(sw_seed)),
    }
    if isinstance(reference, GaussianMixture):
        def weights_tv(p: Tensor) -> float:
            counts = torch.bincount(reference.responsibilities(p).argmax(1), minlength=reference.K).to(F64)
            return float(0.5 * (counts / counts.sum() - reference.weights).abs().sum())

        out["log_likelihood"] = float(reference.log_prob(x).mean())
        out["log_likelihood_real"] = float(reference.log_prob(real_a).mean())
        out["weights_tv"], out["weights_tv_floor"] = weights_tv(x), weights_tv(real_a)
    return out


def format_metrics(d: dict, sep: str = "\n") -> str:
    """One line per metric, its floor beside it: ``fd 3.21 (real-vs-real floor 1.05)``."""
    def fmt(v) -> str:
        if isinstance(v, (list, tuple)):
            return "[" + " ".join(fmt(u) for u in v) + "]"
        return str(v) if isinstance(v, int) else f"{v:.3g}"

    lines = []
    for k, v in d.items():
        if k.endswith(("_floor", "_real")):
            continue
        line = f"{k} {fmt(v)}"
        if f"{k}_floor" in d:
            line += f" (real-vs-real floor {fmt(d[f'{k}_floor'])})"
        if f"{k}_real" in d:
            line += f" (real data {fmt(d[f'{k}_real'])})"
        lines.append(line)
    return sep.join(lines)
