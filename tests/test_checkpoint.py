"""Checkpoints: directory layout, atomic writes under a crash, keep-last-k, safe loading, sampling."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import tinyddpm as td
import tinyddpm.training.checkpoint as ckpt_mod
from tinyddpm.data.datasets import load_dataset
from tinyddpm.nets.presets import build_model
from tinyddpm.sampling.from_checkpoint import sampler_kwargs
from tinyddpm.training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    read_state,
    resolve_checkpoint,
)
from tinyddpm.training.config import DiffusionConfig, TrainConfig
from tinyddpm.training.trainer import Trainer

DIFF = DiffusionConfig(T=40)


def make_trainer(out, num_classes=None, **kw) -> Trainer:
    torch.manual_seed(0)
    model = build_model("mlp", dict(dim=2, hidden=16, depth=1, time_dim=8, num_classes=num_classes))
    base = dict(steps=10, batch_size=8, lr=1e-3, warmup_steps=0, device="cpu", progress=False, ema_decay=0.5,
                ckpt_every=0)  # checkpoints at the end of train() only, unless a test asks for more
    base.update(kw)
    return Trainer(model, DIFF.build(), load_dataset("mixture", n=64), TrainConfig(**base), out, DIFF)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layout_and_round_trip(tmp_path):
    tr = make_trainer(tmp_path)
    tr.train()
    step_dir = tmp_path / "step_000010"
    assert sorted(p.name for p in step_dir.iterdir()) == sorted(ckpt_mod.FILES)
    assert (tmp_path / "latest").read_text() == "step_000010\n"
    cfg = json.loads((step_dir / "config.json").read_text())
    assert cfg["step"] == 10 and cfg["model"]["kind"] == "mlp" and cfg["model"]["config"]["hidden"] == 16
    assert cfg["diffusion"] == DIFF.to_dict() and cfg["train"]["lr"] == 1e-3
    assert cfg["data"] == {"name": "mixture", "shape": [2], "n": 64, "num_classes": 8, "is_image": False}
    assert isinstance(cfg["tinyddpm_version"], str)
    ck = load_checkpoint(tmp_path)  # run dir -> latest; EMA weights by default
    assert ck.step == 10 and ck.ema and ck.path == step_dir and ck.sample_shape == (2,)
    assert same(weights(ck.model), weights(tr.ema_model))
    assert not same(weights(ck.model), weights(tr.model))  # EMA with d = 0.5 differs from the raw weights
    raw = load_checkpoint(step_dir, ema=False)
    assert same(weights(raw.model), weights(tr.model))
    assert torch.equal(ck.schedule.alpha_bars, DIFF.build().alpha_bars)
    assert not ck.model.training and not any(p.requires_grad for p in ck.model.parameters())


def test_a_crash_while_writing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, steps=5)
    tr.train()
    good = weights(tr.model)

    def crash(state, path):  # half a file, then the process "dies"
        path.write_bytes(b"\x80\x02partial")
        raise OSError("simulated crash while writing state.pt")

    monkeypatch.setattr(ckpt_mod, "_save_state", crash)
    with pytest.raises(OSError, match="simulated crash"):
        tr.train(5)
    assert tr.step == 10
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp dir cleaned up
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000005"]
    assert (tmp_path / "latest").read_text().strip() == "step_000005"
    assert same(weights(load_checkpoint(tmp_path, ema=False).model), good)
    monkeypatch.undo()
    resumed = Trainer.resume(tmp_path, load_dataset("mixture", n=64))
    assert resumed.step == 5 and same(weights(resumed.model), good)


def test_a_crash_while_renaming_latest_leaves_the_old_pointer(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, steps=5)
    tr.train()
    real_replace = ckpt_mod.os.replace

    def replace(src, dst):
        if str(dst).endswith("latest"):
            raise OSError("simulated crash before the pointer moved")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(OSError, match="pointer"):
        tr.train(3)
    monkeypatch.undo()
    # the new step directory is complete, but `latest` still names the old (complete) one
    assert (tmp_path / "latest").read_text().strip() == "step_000005"
    assert load_checkpoint(tmp_path).step == 5 and load_checkpoint(tmp_path / "step_000008").step == 8
    assert not any(p.name.startswith(".latest") for p in tmp_path.iterdir())


def test_keep_last_k(tmp_path):
    make_trainer(tmp_path, steps=10, ckpt_every=2, keep_last=2).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000008", "step_000010"]
    make_trainer(tmp_path / "one", steps=4, ckpt_every=1, keep_last=1).train()
    assert [p.name for p in list_checkpoints(tmp_path / "one")] == ["step_000004"]


def test_resaving_a_step_replaces_it(tmp_path):
    tr = make_trainer(tmp_path, steps=3)
    tr.train()
    tr.save()
    assert [p.name for p in tmp_path.iterdir()] and [p.name for p in list_checkpoints(tmp_path)] == ["step_000003"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_loading_refuses_a_state_that_would_run_code(tmp_path):
    make_trainer(tmp_path, steps=2).train()
    step_dir = resolve_checkpoint(tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"step": 2, "evil": Payload(marker)}, step_dir / "state.pt")
    with pytest.raises(ValueError, match="refusing to load .*state.pt.*could run code"):
        read_state(step_dir)
    with pytest.raises(ValueError, match="refusing to load"):
        Trainer.resume(tmp_path, load_dataset("mixture", n=64))
    assert not marker.exists()
    # the payload is real: a plain unpickler would have run it (so the test above can fail)
    with open(step_dir / "state.pt", "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.read_text() == "pwned"
    # load_checkpoint reads only JSON and safetensors: sampling needs no pickle at all
    assert load_checkpoint(tmp_path).step == 2


def test_missing_or_broken_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step_000099\n")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path)


def test_save_refuses_non_finite_weights(tmp_path):
    tr = make_trainer(tmp_path, steps=1)
    with torch.no_grad():
        next(tr.model.parameters()).fill_(float("nan"))
    with pytest.raises(td.TrainingDiverged, match="NaN"):
        tr.save()
    assert list_checkpoints(tmp_path) == []


def test_checkpoint_sampling_in_chunks(tmp_path):
    make_trainer(tmp_path, steps=2, num_classes=8).train()
    ck = load_checkpoint(tmp_path)
    seen = []
    ck.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    chunks = list(ck.sample_chunks(23, steps=4, batch_size=5, generator=torch.Generator().manual_seed(1)))
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 3] and max(seen) == 5
    again = ck.sample(23, steps=4, batch_size=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.cat(chunks), again)  # same seed and chunking: same samples
    y = torch.arange(23) % 8
    assert ck.sample(23, steps=4, batch_size=10, y=y, guidance=1.0).shape == (23, 2)
    with pytest.raises(ValueError, match="got 5 labels for n = 23"):
        ck.sample(23, y=torch.arange(5))


def test_sampler_kwargs_validation():
    assert sampler_kwargs("ddim", 100, None, None) == {"steps": 50}
    assert sampler_kwargs("ddim", 100, 10, 0.5) == {"steps": 10, "eta": 0.5}
    assert sampler_kwargs("ddpm", 100, None, None) == {}
    assert sampler_kwargs("ddpm", 100, 100, 0.0) == {}
    with pytest.raises(ValueError, match="sampler must be one of 'ddpm', 'ddim'"):
        sampler_kwargs("no_such_sampler", 100, 10, None)
    with pytest.raises(ValueError, match="steps must be <= 100"):
        sampler_kwargs("ddim", 100, 101, None)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        sampler_kwargs("ddim", 100, 10, -1.0)
    with pytest.raises(ValueError, match="'ddpm' always takes all T = 100 steps"):
        sampler_kwargs("ddpm", 100, 50, None)
    with pytest.raises(ValueError, match="'dpmpp_2m' takes no eta"):
        sampler_kwargs("dpmpp_2m", 100, 10, 0.3)


def test_weights_only_state_holds_everything_needed(tmp_path):
    make_trainer(tmp_path, steps=3).train()
    state = read_state(resolve_checkpoint(tmp_path))
    assert state["step"] == 3 and set(state["rng"]) >= {"batch", "noise", "torch"}
    assert state["ema"]["num_updates"] == 3 and "model" not in state["ema"]
    with pytest.raises(pickle.UnpicklingError):  # the file really is a restricted pickle: no classes
        torch.save({"x": Payload(tmp_path / "m2")}, tmp_path / "s.pt")
        torch.load(tmp_path / "s.pt", weights_only=True)


def test_load_or_train_trains_once_then_loads(tmp_path, monkeypatch):
    import tinyddpm.pretrained as pre

    tiny = pre.Recipe("moons", "toy-mlp", DiffusionConfig(T=20),
                      TrainConfig(steps=3, batch_size=8, device="cpu", progress=False, keep_last=1),
                      model_overrides={"hidden": 16, "depth": 1})
    monkeypatch.setattr(pre, "RECIPES", {"tiny": tiny})
    first = pre.load_or_train("tiny", cache=tmp_path)
    assert first.step == 3 and first.model_config["hidden"] == 16
    assert first.path.parent == tmp_path / f"tiny-{tiny.digest()}"
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-{tiny.digest()}"]  # no partial dirs left

    def no_training(*a, **k):
        raise AssertionError("a cached recipe must not be retrained")

    monkeypatch.setattr(pre, "train_recipe", no_training)
    again = pre.load_or_train("tiny", cache=tmp_path)
    assert same(weights(again.model), weights(first.model))
    # a different recipe hashes differently (so an edited recipe retrains), progress does not count
    other = pre.Recipe("moons", "toy-mlp", DiffusionConfig(T=20), tiny.train.replace(lr=2e-3),
                       model_overrides={"hidden": 16, "depth": 1})
    quiet = pre.Recipe("moons", "toy-mlp", DiffusionConfig(T=20), tiny.train.replace(progress=True),
                       model_overrides={"hidden": 16, "depth": 1})
    assert other.digest() != tiny.digest() and quiet.digest() == tiny.digest()
    with pytest.raises(ValueError, match="recipe must be one of 'tiny'"):
        pre.load_or_train("imagenet", cache=tmp_path)


def test_builtin_recipes_are_well_formed():
    from tinyddpm.pretrained import RECIPES, recipe_dir

    assert set(RECIPES) == {"digits", "digits-cond", "toy"}
    assert RECIPES["digits-cond"].conditional and RECIPES["digits-cond"].train.label_dropout == 0.1
    assert len({r.digest() for r in RECIPES.values()}) == 3
    assert recipe_dir("digits", "/c").name == f"digits-{RECIPES['digits'].digest()}"
