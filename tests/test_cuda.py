"""The CUDA tier: training, resuming, EMA, samplers, guidance and text-to-image on a GPU.

Every test here carries ``@pytest.mark.cuda`` and is skipped without a GPU; ``benchmarks/gpu_check``
runs them (``pytest -m cuda``) on a machine that has one. Only the public API is used.
"""

from __future__ import annotations

import math

import pytest
import torch

import tinyddpm as td

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

T = 50  # a short schedule keeps "ddpm" (always all T steps) quick


def small_unet(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kind, cfg = td.preset("digits-tiny", base_channels=16, **overrides)
    return td.build_model(kind, cfg)


def digits(n: int = 512) -> td.Dataset:
    return td.load_dataset("digits", n=n, seed=0)


def config(bf16: bool = True, **kw) -> td.TrainConfig:
    base = dict(precision="bf16" if bf16 else "fp32", steps=20, batch_size=32, lr=1e-3, warmup_steps=5,
                log_every=0, progress=False, ckpt_every=10,
                seed=0, device="cuda")
    return td.TrainConfig(**{**base, **kw})


def params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


# --- training, resuming, EMA ---------------------------------------------------------------------


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_train_resume_and_ema_on_cuda(tmp_path, bf16, compile_):
    s = td.NoiseSchedule.linear(T)
    data = digits()
    straight = td.Trainer(small_unet(), s, data, config(bf16=bf16, compile=compile_), out_dir=tmp_path / "a")
    init = params(straight.model)
    hist = straight.train()
    assert len(hist) == 20 and all(math.isfinite(r["loss"]) for r in hist)
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in straight.ema_model.parameters())
    raw, ema = params(straight.model), params(straight.ema_model)
    assert not torch.equal(raw, init) and not torch.equal(ema, raw)          # both moved, EMA lags
    # the same run interrupted at step 10 and resumed
    first = td.Trainer(small_unet(), s, data, config(bf16=bf16, compile=compile_, steps=10), out_dir=tmp_path / "b")
    first.train()
    saved_ema = params(first.ema_model)
    resumed = td.Trainer.resume(tmp_path / "b", data, steps=20)
    assert resumed.step == 10 and torch.equal(params(resumed.ema_model), saved_ema)
    resumed.train()
    assert resumed.step == 20
    # CUDA kernels are not bit-reproducible (atomics in backward), so "the same run" means: the resumed
    # weights sit far closer to the uninterrupted run's than either sits to where training started
    moved = (raw - init).abs().max().item()
    diff = (params(resumed.model) - raw).abs().max().item()
    assert math.isfinite(diff) and diff < 0.1 * moved, (diff, moved)


def test_checkpoint_moves_between_cpu_and_cuda(tmp_path):
    s = td.NoiseSchedule.linear(T)
    data = digits()
    cpu = td.Trainer(small_unet(), s, data, config(device="cpu", steps=5, bf16=False), out_dir=tmp_path)
    cpu.train()
    weights = params(cpu.model)
    gpu = td.Trainer.resume(tmp_path, data, device="cuda", steps=10)
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
    assert torch.equal(params(gpu.model), weights)
    gpu.train()
    after_gpu = params(gpu.model)
    back = td.Trainer.resume(tmp_path, data, device="cpu", steps=12)
    assert back.step == 10 and back.device.type == "cpu" and torch.equal(params(back.model), after_gpu)
    back.train()
    assert back.step == 12
    ck = td.load_checkpoint(tmp_path, device="cuda")
    x = ck.sample(4, steps=5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


# --- sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(td.SAMPLERS))
def test_every_sampler_on_cuda_with_a_cpu_generator(name):
    s = td.NoiseSchedule.linear(1000)      # the samplers' usual schedule ("ddpm": 1,000 tiny-UNet calls)
    model = small_unet().eval()
    kw = {} if name == "ddpm" else {"steps": 10}

    def run(device: str) -> torch.Tensor:
        net = model.to(device)
        with torch.no_grad():
            return td.sample(name, net, s, (4, 1, 8, 8), generator=torch.Generator().manual_seed(1),
                             device=device, **kw)

    x = run("cuda")
    assert x.device.type == "cuda" and x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    assert torch.allclose(run("cuda"), x)                          # same CPU seed, same result
    ref = run("cpu")                                               # ...and the same numbers as on CPU
    assert (x.cpu() - ref).abs().max().item() < 1e-2


def test_classifier_free_guidance_on_cuda():
    s = td.NoiseSchedule.linear(T)
    model = small_unet(num_classes=10).cuda().eval()
    guided = td.guided_model(model, 3, 2.0, num_classes=10)
    x = torch.randn(4, 1, 8, 8, device="cuda")
    t = torch.full((4,), 20, device="cuda", dtype=torch.long)
    with torch.no_grad():
        eps_c = model(x, t, y=torch.full((4,), 3, device="cuda"))
        eps_u = model(x, t, y=torch.full((4,), 10, device="cuda"))
        assert torch.allclose(guided(x, t), eps_u + 2.0 * (eps_c - eps_u), atol=1e-4)
        out = td.sample("ddim", guided, s, (4, 1, 8, 8), steps=10, generator=torch.Generator().manual_seed(0),
                        device="cuda")
    assert out.is_cuda and torch.isfinite(out).all()


def test_text_to_image_pipeline_on_cuda(tmp_path):
    cfg = td.Text2ImgConfig(vae_steps=20, steps=20, batch_size=32)
    pipe = td.train_text2img(digits(), cfg, device="cuda")
    assert pipe.device.type == "cuda"
    g = lambda: torch.Generator().manual_seed(0)
    x = pipe.generate(["a seven", "a thick two"], guidance=3.0, steps=10, generator=g())
    assert x.is_cuda and x.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1
    pipe.save(tmp_path)
    cpu = td.TextToImage.load(tmp_path, device="cpu")
    y = cpu.generate(["a seven", "a thick two"], guidance=3.0, steps=10, generator=g())
    assert (x.cpu() - y).abs().max().item() < 5e-2


# --- host synchronisations -----------------------------------------------------------------------


@pytest.mark.xfail(strict=False, reason="not verified on a GPU yet: Trainer.train_step reads the loss and "
                                        "gradient norm back once per step, and samplers move CPU noise to "
                                        "the device with blocking copies")
def test_no_host_synchronisation_in_a_training_step_and_a_sampling_loop():
    s = td.NoiseSchedule.linear(T)
    trainer = td.Trainer(small_unet(), s, digits(), config(bf16=True))
    trainer.train_step()                                            # warm-up: allocations, cuDNN autotune
    model = trainer.ema_model
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step()
        with torch.no_grad():
            td.sample("ddim", model, s, (4, 1, 8, 8), steps=10, generator=torch.Generator("cuda").manual_seed(0),
                      device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
