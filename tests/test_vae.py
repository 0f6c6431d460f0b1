"""The tiny AutoencoderKL (tinyddpm.vae, chapter 9): KL term, reparameterisation, scaling, quality."""

import pytest
import torch
from torch.distributions import Normal

from tinyddpm.nets.vae import VAE, VAEConfig, kl_standard_normal
from tinyddpm.training.objectives import train_vae


def test_kl_closed_form_matches_monte_carlo_and_torch():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64) * 0.5
    kl = kl_standard_normal(mean, logvar)
    q, p = Normal(mean, (0.5 * logvar).exp()), Normal(torch.zeros_like(mean), torch.ones_like(mean))
    ref = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(kl, ref, rtol=1e-12, atol=1e-12)
    # Monte Carlo: KL = E_q[log q(z) - log p(z)], 200k draws → standard error ≈ 0.01
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).flatten(2).sum(2).mean(0)
    torch.testing.assert_close(kl, mc, rtol=0, atol=0.05)
    assert kl_standard_normal(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0.0


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return VAE(VAEConfig(channels=8, latent_channels=2, beta=0.1))


def test_shapes_and_validation(tiny_vae):
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    mean, logvar = tiny_vae.encode(x)
    assert mean.shape == logvar.shape == (5, 2, 4, 4)
    assert tiny_vae.decode(mean).shape == (5, 1, 8, 8)
    assert tiny_vae.latent_shape((1, 8, 8)) == (2, 4, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\)"):
        tiny_vae.encode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="even H, W"):
        tiny_vae.encode(torch.zeros(2, 1, 7, 8))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 2, h, w\)"):
        tiny_vae.decode(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="divisible by groups"):
        VAEConfig(channels=12, groups=8)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        VAEConfig(beta=-1.0)
    with pytest.raises(TypeError, match="image Dataset"):
        train_vae([1, 2, 3], steps=1)


def test_loss_is_squared_error_plus_beta_kl(tiny_vae):
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    loss, rec, kl = tiny_vae.loss(x, torch.Generator().manual_seed(1))
    # replay the same ε by hand: z = μ + σ ε, x̂ = D(z)
    mean, logvar = tiny_vae.encode(x)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    x_hat = tiny_vae.decode(mean + (0.5 * logvar).exp() * eps)
    rec_ref = ((x - x_hat) ** 2).sum(dim=(1, 2, 3)).mean()
    kl_ref = (0.5 * (mean**2 + logvar.exp() - 1 - logvar)).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(rec, rec_ref)
    torch.testing.assert_close(kl, kl_ref)
    torch.testing.assert_close(loss, rec_ref + 0.1 * kl_ref)


def test_to_latent_draws_from_the_scaled_posterior(tiny_vae):
    x = torch.rand(1, 1, 8, 8).expand(20_000, 1, 8, 8)
    tiny_vae.scale_factor.fill_(2.0)
    try:
        mean, logvar = (v.detach() for v in tiny_vae.encode(x[:1]))
        z = tiny_vae.to_latent(x, torch.Generator().manual_seed(0))
        # mean 2μ, std 2σ; 20k draws → relative errors ≈ 1 %
        sd = float(2 * (0.5 * logvar).exp().max())
        torch.testing.assert_close(z.mean(0, keepdim=True), 2 * mean, rtol=0, atol=0.05 * sd)
        torch.testing.assert_close(z.std(0, keepdim=True), 2 * (0.5 * logvar).exp(), rtol=0.03, atol=0)
        torch.testing.assert_close(tiny_vae.to_latent(x[:1]), 2 * mean)          # no generator: the mean
        torch.testing.assert_close(tiny_vae.from_latent(2 * mean), tiny_vae.decode(mean))
    finally:
        tiny_vae.scale_factor.fill_(1.0)


def test_fingerprint_tracks_the_weights(tiny_vae):
    clone = VAE(tiny_vae.config)
    clone.load_state_dict(tiny_vae.state_dict())
    assert clone.fingerprint() == tiny_vae.fingerprint()
    with torch.no_grad():
        clone.decoder[0].bias[0] += 1e-3
    assert clone.fingerprint() != tiny_vae.fingerprint()


def test_train_vae_is_deterministic_per_seed():
    x = torch.rand(32, 1, 8, 8) * 2 - 1
    cfg = VAEConfig(channels=8)
    a, b = (train_vae(x, config=cfg, steps=3, batch_size=8, seed=5) for _ in range(2))
    c = train_vae(x, config=cfg, steps=3, batch_size=8, seed=6)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert not any(p.requires_grad for p in a.parameters()) and not a.training   # frozen for latent diffusion


@pytest.fixture(scope="module")
def trained():
    from tinyddpm.data.datasets import load_dataset

    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    # 300 steps train in about 4 s on one core: reconstruction MSE 0.017 and classifier accuracy on the
    # reconstructions 0.980, as on the originals (150 steps: 0.037 and 0.966, for a saving of under a second)
    vae = train_vae(train, steps=300, seed=0)
    return vae, train, test


def test_scaled_latents_have_unit_variance(trained):
    vae, train, test = trained
    z = vae.to_latent(train.x, torch.Generator().manual_seed(0))
    assert abs(float(z.std()) - 1) < 0.02                             # fitted on train draws
    assert abs(float(vae.to_latent(test.x, torch.Generator().manual_seed(1)).std()) - 1) < 0.1  # held out
    assert abs(float(z.mean())) < 0.3


def test_reconstructions_keep_their_digit(trained):
    from tinyddpm.metrics import digits_classifier

    vae, _, test = trained
    rec = vae.from_latent(vae.to_latent(test.x)).clamp(-1, 1)
    mse = float((rec - test.x).pow(2).mean())
    assert mse < 0.05                                                 # per pixel, range [-1, 1]; blank digit ≈ 0.9
    clf = digits_classifier()
    acc = lambda x: float((clf.predict_proba(x).argmax(1) == test.labels).double().mean())  # noqa: E731
    assert acc(rec) >= acc(test.x) - 0.05
