"""Cross-attention, the SpatialTransformer, the latent UNet and the text-to-image pipeline (chapter 9)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tinyddpm.diffusion.schedule import NoiseSchedule
from tinyddpm.nets.attention import MultiHeadAttention, SpatialTransformer, attention
from tinyddpm.nets.text import TextEncoder, TextEncoderConfig, Tokenizer
from tinyddpm.nets.vae import VAE, VAEConfig
from tinyddpm.text2img import (
    CrossAttnUNet,
    CrossAttnUNetConfig,
    Text2ImgConfig,
    TextToImage,
    sample_prompt,
    train_text2img,
)


# ---------------------------------------------------------------- attention, eq. (eq-cross-attention)
def test_attention_matches_a_brute_force_loop_and_respects_the_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 4, generator=g, dtype=torch.float64) for n in (5, 6, 6))
    mask = torch.tensor([[True] * 6, [True, True, False, True, False, False]])
    out, w = attention(q, k, v, mask)
    assert out.shape == (2, 3, 5, 4) and w.shape == (2, 3, 5, 6)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                keep = [j for j in range(6) if mask[b, j]]
                s = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(4) for j in keep]
                e = [math.exp(x - max(s)) for x in s]
                ref = torch.zeros(6, dtype=torch.float64)
                ref[keep] = torch.tensor(e, dtype=torch.float64) / sum(e)
                torch.testing.assert_close(w[b, h, i], ref, rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(out[b, h, i], ref @ v[b, h], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (w[1][..., ~mask[1]] == 0).all()                         # padded keys: exactly zero weight
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(out, ref)


def test_attention_mask_validation():
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(B, M\)"):
        attention(q, q, q, torch.ones(1, 2))
    with pytest.raises(ValueError, match="at least one True"):
        attention(q, q, q, torch.zeros(1, 2, dtype=torch.bool))


def test_spatial_transformer_starts_as_identity_and_ignores_padding():
    torch.manual_seed(0)
    st = SpatialTransformer(16, context_dim=12, heads=4, groups=4)
    h, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 12)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    assert torch.equal(st(h, ctx, mask), h)                          # zero-initialised proj_out
    torch.nn.init.normal_(st.proj_out.weight)
    st.store_attention = True
    out = st(h, ctx, mask)
    assert out.shape == h.shape and not torch.allclose(out, h)
    w = st.last_attention
    assert w.shape == (2, 4, 16, 5)                                  # (B, heads, H·W, K)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 16), rtol=0, atol=1e-6)
    assert (w[0, ..., 3:] == 0).all()
    ctx2 = ctx.clone()
    ctx2[0, 3:] = 100 * torch.randn(2, 12)                            # change only the padded words
    torch.testing.assert_close(st(h, ctx2, mask), out, rtol=0, atol=1e-6)
    ctx2[0, 0] += 1                                                   # a real word does matter
    assert not torch.allclose(st(h, ctx2, mask), out)
    with pytest.raises(ValueError, match=r"context must have shape \(B=2, K, E\)"):
        st(h, ctx[0], mask)
    with pytest.raises(ValueError, match="divisible by groups"):
        SpatialTransformer(10, 12, groups=4)


def test_cross_attention_learns_to_look_at_the_informative_token():
    """Context: 6 filler tokens and one digit token at a random place; predict the digit from the
    attention output of a single query. After a little training the attention mass on the digit
    token is far above that on any filler (which uniform attention would give 1/7 each)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    emb = torch.nn.Embedding(16, 16)                                  # ids 0..9 digits, 10..15 fillers
    attn = MultiHeadAttention(16, 16, heads=1)
    query = torch.nn.Parameter(torch.randn(1, 1, 16))
    head = torch.nn.Linear(16, 10)
    params = [*emb.parameters(), *attn.parameters(), query, *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)

    def batch(n):
        ids = torch.randint(10, 16, (n, 7), generator=g)
        digit = torch.randint(0, 10, (n,), generator=g)
        pos = torch.randint(0, 7, (n,), generator=g)
        ids[torch.arange(n), pos] = digit
        return ids, digit, pos

    for _ in range(300):
        ids, digit, _ = batch(64)
        logits = head(attn(query.expand(64, 1, 16), emb(ids))[:, 0])
        loss = F.cross_entropy(logits, digit)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, digit, pos = batch(256)
    attn.store_attention = True
    with torch.no_grad():
        logits = head(attn(query.expand(256, 1, 16), emb(ids))[:, 0])
    w = attn.last_attention[:, 0, 0]                                  # (256, 7)
    on_digit = w[torch.arange(256), pos]
    on_filler = (w.sum(1) - on_digit) / 6
    assert (logits.argmax(1) == digit).float().mean() > 0.9
    assert on_digit.mean() > 0.6 and (on_digit > on_filler).float().mean() > 0.85   # uniform: 1/7 and 0


# ---------------------------------------------------------------- the UNet and the pipeline
def _tiny_pipeline(seed=0, latent_channels=2):
    torch.manual_seed(seed)
    tok = Tokenizer.for_digits(max_length=6)
    text = TextEncoder(TextEncoderConfig(vocab_size=len(tok), max_length=6, dim=16, depth=1, heads=2))
    unet = CrossAttnUNet(CrossAttnUNetConfig(latent_channels=2, channels=8, context_dim=16, heads=2, groups=4))
    vae = VAE(VAEConfig(channels=8, latent_channels=latent_channels))
    for p in unet.out.parameters():                                   # leave the zero init: outputs must vary
        torch.nn.init.normal_(p, std=0.1)
    return TextToImage(tok, text, unet, vae, NoiseSchedule.linear(T=50), (1, 8, 8)).eval()


def test_unet_shapes_zero_init_and_errors():
    torch.manual_seed(0)
    unet = CrossAttnUNet(CrossAttnUNetConfig(channels=8, context_dim=16, heads=2, groups=4))
    z, t, ctx = torch.randn(3, 2, 4, 4), torch.tensor([1, 5, 9]), torch.randn(3, 6, 16)
    mask = torch.ones(3, 6, dtype=torch.bool)
    assert torch.equal(unet(z, t, ctx, mask), torch.zeros_like(z))    # zero-initialised output conv
    assert len(unet.spatial_transformers()) == 5
    with pytest.raises(ValueError, match="needs context"):
        unet(z, t)
    with pytest.raises(ValueError, match=r"latent \(B, 2, h, w\)"):
        unet(torch.randn(3, 1, 4, 4), t, ctx, mask)
    with pytest.raises(TypeError, match="integer tensor"):
        unet(z, t.bool(), ctx, mask)


def test_pipeline_generate_shapes_determinism_and_cfg():
    pipe = _tiny_pipeline()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    x = pipe.generate(["a seven", "3"], steps=5, generator=g())
    assert x.shape == (2, 1, 8, 8) and x.abs().max() <= 1
    assert torch.equal(x, pipe.generate(["a seven", "3"], steps=5, generator=g()))
    # guided ε in one doubled batch == ε_u + w (ε_c - ε_u) from two separate passes
    z, t = torch.randn(2, 2, 4, 4), torch.tensor([10, 40])
    ctx_c, m_c = pipe.encode_prompts(["a seven", "3"])
    ctx_u, m_u = pipe.encode_prompts(["", ""])
    eps_c, eps_u = pipe.unet(z, t, ctx_c, m_c), pipe.unet(z, t, ctx_u, m_u)
    torch.testing.assert_close(pipe.guided_denoiser(["a seven", "3"], 3.0)(z, t), eps_u + 3.0 * (eps_c - eps_u),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pipe.guided_denoiser(["a seven", "3"], 1.0)(z, t), eps_c)
    torch.testing.assert_close(pipe.guided_denoiser(["a seven", "3"], 0.0)(z, t), eps_u, rtol=1e-5, atol=1e-6)
    # a negative prompt takes the place of the empty one: ε_neg + w (ε_c - ε_neg). The zero-initialised
    # cross-attention outputs are given weights first, so that the prompt changes ε at all
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.abs().max() == 0:
                p.normal_(std=0.1)
    ctx_c, m_c = pipe.encode_prompts(["a seven", "3"])
    ctx_u, m_u = pipe.encode_prompts(["", ""])
    eps_c, eps_u = pipe.unet(z, t, ctx_c, m_c), pipe.unet(z, t, ctx_u, m_u)
    ctx_n, m_n = pipe.encode_prompts(["thick", "thin"])
    eps_n = pipe.unet(z, t, ctx_n, m_n)
    assert (eps_n - eps_u).abs().max() > 1e-3                        # the negative branch is a different input
    torch.testing.assert_close(pipe.guided_denoiser(["a seven", "3"], 3.0, ["thick", "thin"])(z, t),
                               eps_n + 3.0 * (eps_c - eps_n), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        pipe.guided_denoiser(["a seven", "3"], 3.0, ["thick"])
    lat = pipe.generate("a seven", steps=3, generator=g(), return_latents=True)
    assert lat.shape == (1, 2, 4, 4)
    with pytest.raises(ValueError, match="sampler must be one of"):
        pipe.generate("a seven", sampler="magic")
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        pipe.generate("a seven", guidance=-1.0)
    with pytest.raises(ValueError, match="at least one prompt"):
        pipe.generate([])


def test_vae_unet_mismatch_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match="does not belong to this UNet"):
        _tiny_pipeline(latent_channels=3)
    pipe = _tiny_pipeline()
    step = pipe.save(tmp_path / "p")
    other = _tiny_pipeline(seed=1)
    for name in ("model.safetensors", "ema.safetensors"):     # graft a foreign VAE into the checkpoint
        w = load_file(step / name)
        w.update({k: v for k, v in other.state_dict().items() if k.startswith("vae.")})
        save_file(w, step / name)
    with pytest.raises(ValueError, match="not the one the UNet was trained with"):
        TextToImage.load(tmp_path / "p")
    q = pipe.save(tmp_path / "q")
    meta = json.loads((q / "config.json").read_text())
    meta["model"]["config"]["latent_shape"] = [2, 2, 2]
    (q / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="the UNet was trained on"):
        TextToImage.load(tmp_path / "q")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        TextToImage.load(tmp_path / "nowhere")


def test_the_pipeline_is_an_ordinary_checkpoint(tmp_path):
    """One format: load_checkpoint reads a saved pipeline and names its kind; no pickled code anywhere."""
    from tinyddpm.training.checkpoint import FILES, load_checkpoint

    pipe = _tiny_pipeline()
    step = pipe.save(tmp_path / "p")
    assert sorted(p.name for p in step.iterdir()) == sorted(FILES)
    ck = load_checkpoint(tmp_path / "p")
    assert ck.model_kind == "text2img" and isinstance(ck.model, TextToImage)
    assert ck.schedule.T == 50 and ck.sample_shape == (1, 8, 8)
    for k, v in pipe.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v), k
    assert not ck.model.training and not any(p.requires_grad for p in ck.model.parameters())
    mlp_run = tmp_path / "mlp"
    from tinyddpm.nets.presets import build_model
    from tinyddpm.training.checkpoint import save_checkpoint

    mlp = build_model("mlp", {"dim": 2})
    save_checkpoint(mlp_run, step=0, model=mlp, ema_model=mlp,
                    config={"format": 1, "step": 0, "model": {"kind": "mlp", "config": {"dim": 2}}}, state={})
    with pytest.raises(ValueError, match="holds a 'mlp' model, not a text-to-image pipeline"):
        TextToImage.load(mlp_run / "step_000000")


def test_save_load_round_trip_and_sample_prompt(tmp_path):
    pipe = _tiny_pipeline()
    pipe.save(tmp_path / "p")
    loaded = TextToImage.load(tmp_path / "p")
    a = pipe.generate(["a thick 3"] * 2, steps=4, generator=torch.Generator().manual_seed(0))
    b = loaded.generate(["a thick 3"] * 2, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    x = sample_prompt(tmp_path / "p", "a thick 3", n=2, guidance=3.0, steps=4,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, a)
    assert not torch.equal(x, sample_prompt(tmp_path / "p", "a thick 3", n=2, steps=4,
                                                generator=torch.Generator().manual_seed(1)))


def test_train_text2img_runs_and_is_deterministic():
    from tinyddpm.data.datasets import Dataset, load_dataset

    d = load_dataset("digits", split="train")
    small = Dataset(d.x[:40], d.labels[:40], 10, "digits")
    cfg = Text2ImgConfig(
        vae=VAEConfig(channels=8), vae_steps=2, steps=2, batch_size=4,
        text=TextEncoderConfig(vocab_size=0, dim=16, depth=1, heads=2), text_encoder="joint",
        unet=CrossAttnUNetConfig(channels=8, context_dim=16, heads=2, groups=4),
    )
    a, b = train_text2img(small, cfg), train_text2img(small, cfg)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert a.config.text.vocab_size == len(a.tokenizer)
    with pytest.raises(ValueError, match="unet.context_dim"):
        Text2ImgConfig(unet=CrossAttnUNetConfig(context_dim=32))
    with pytest.raises(ValueError, match="unet.context_dim"):
        Text2ImgConfig(text_encoder="joint", unet=CrossAttnUNetConfig(context_dim=32))
    with pytest.raises(ValueError, match="digit labels"):
        train_text2img(Dataset(d.x[:4]), cfg)
    assert Text2ImgConfig.from_dict(cfg.to_dict()) == cfg


def test_train_text2img_resumes_bit_exactly(tmp_path):
    """The text-to-image stage is a Trainer run: 4 steps straight == 2 steps, a fresh Trainer from the
    checkpoint alone, 2 more — bit for bit; and the run directory loads as a pipeline."""
    from tinyddpm.data.datasets import Dataset, load_dataset
    from tinyddpm.text2img import text2img_trainer
    from tinyddpm.training.trainer import Trainer

    d = load_dataset("digits", split="train")
    small = Dataset(d.x[:40], d.labels[:40], 10, "digits")
    cfg = Text2ImgConfig(
        vae=VAEConfig(channels=8), vae_steps=2, steps=4, batch_size=4, ema_decay=0.5,
        text=TextEncoderConfig(vocab_size=0, dim=16, depth=1, heads=2), text_encoder="joint",
        unet=CrossAttnUNetConfig(channels=8, context_dim=16, heads=2, groups=4),
    )
    straight = train_text2img(small, cfg, out_dir=tmp_path / "a")
    text2img_trainer(small, cfg, out_dir=tmp_path / "b").train(2)
    torch.manual_seed(123)                                           # whatever happened in between
    resumed = Trainer.resume(tmp_path / "b", small)
    assert resumed.step == 2 and resumed.objective.name == "text2img"
    resumed.train()
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.ema_model.state_dict()[k], v), k
    loaded = TextToImage.load(tmp_path / "b")
    for k, v in straight.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    from tinyddpm.text2img import is_text2img_checkpoint

    assert is_text2img_checkpoint(tmp_path / "b") and not is_text2img_checkpoint(tmp_path / "nowhere")

    # a jointly trained pipeline's config.json has no "text_encoder" key (as every checkpoint written
    # before the frozen CLIP became the default): it loads as "joint", its text encoder trainable
    import json

    from tinyddpm.training.checkpoint import resolve_checkpoint

    saved = json.loads((resolve_checkpoint(tmp_path / "b") / "config.json").read_text())
    assert "text_encoder" not in saved["model"]["config"]["config"]
    assert loaded.config.text_encoder == "joint" and not loaded.frozen_text and loaded.config == straight.config
