"""The Trainer reading streamed sets and flipped images through make_batch_source; the CLI's
--objective (flow, EDM), --stream and --hflip; sampling a checkpoint with the sampler its objective needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tinyddpm as td
from tinyddpm.cli import main
from tinyddpm.data import Dataset
from tinyddpm.data.stream import ImageFolderStream
from tinyddpm.training.checkpoint import load_checkpoint


def png_folder(path, n: int, size: int = 6) -> None:
    rng = np.random.default_rng(1)
    for i in range(n):
        (path / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / "ab"[i % 2] / f"{i}.png")


class CountingFolder(ImageFolderStream):
    """A streamed folder that counts the images decoded (workers = 0: all in this process)."""

    reads = 0

    def __getitem__(self, i: int) -> torch.Tensor:
        type(self).reads += 1
        return super().__getitem__(i)


def tiny_unet(channels: int = 3, size: int = 6) -> td.UNet:
    torch.manual_seed(0)
    return td.UNet(in_channels=channels, image_size=size, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                   attention_levels=(), groups=4)


def config(**kw) -> td.TrainConfig:
    base = dict(steps=6, batch_size=8, warmup_steps=0, device="cpu", progress=False, num_workers=0,
                log_every=0, ckpt_every=0, ckpt_minutes=0)
    return td.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "imgs"
    png_folder(path, 600)
    return path


def test_streamed_training_reads_only_its_batches_and_never_holds_the_set(folder):
    data = CountingFolder(folder, image_size=6)
    CountingFolder.reads = 0
    tr = td.Trainer(tiny_unet(), td.NoiseSchedule.cosine(50), data, config(steps=5))
    assert tr.objective.x is None                              # nothing was loaded up front
    tr.train()
    assert CountingFolder.reads == 5 * 8                       # exactly the images of five batches of 8


def test_streamed_training_resumes_bit_for_bit(folder, tmp_path):
    s = td.NoiseSchedule.cosine(50)
    straight = td.Trainer(tiny_unet(), s, ImageFolderStream(folder, image_size=6), config(hflip=True))
    straight.train()
    first = td.Trainer(tiny_unet(), s, ImageFolderStream(folder, image_size=6), config(hflip=True, steps=3),
                       tmp_path / "run")
    first.train()
    resumed = td.Trainer.resume(tmp_path / "run", ImageFolderStream(folder, image_size=6), steps=6)
    assert resumed.step == 3 and resumed.batch_source.state_dict()["position"] == 24
    resumed.train()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_hflip_feeds_rows_or_their_mirror_images(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(600, 1, 4, 4, generator=g) * 2 - 1
    tr = td.Trainer(tiny_unet(1, 4), td.NoiseSchedule.cosine(50), Dataset(x), config(hflip=True, batch_size=64))
    batch = tr.next_batch()
    rows = x[batch["idx"]]
    same = (batch["x0"] == rows).flatten(1).all(1)
    mirrored = (batch["x0"] == rows.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54   # about half, each one or the other


def test_a_resume_that_changes_the_batch_order_is_refused(tmp_path):
    x = torch.rand(600, 1, 4, 4) * 2 - 1
    s = td.NoiseSchedule.cosine(50)
    td.Trainer(tiny_unet(1, 4), s, Dataset(x), config(steps=2), tmp_path / "run").train()
    with pytest.raises(ValueError, match="hflip: checkpoint has False, this run has True"):
        td.Trainer.resume(tmp_path / "run", Dataset(x), hflip=True)


def test_an_objective_that_reads_by_index_refuses_streaming(folder):
    from tinyddpm.text2img import Text2ImgObjective

    data = td.load_dataset("digits")
    with pytest.raises(ValueError, match="reads its data by index"):
        td.Trainer(tiny_unet(1, 8), td.NoiseSchedule.cosine(50), data, config(hflip=True),
                   objective=Text2ImgObjective(td.NoiseSchedule.cosine(50)))


@pytest.mark.parametrize("objective, default", [("flow", "euler"), ("edm", "ddim, eta 1")])
def test_cli_trains_and_samples_each_objective(objective, default, tmp_path, capsys):
    out = tmp_path / objective
    assert main(["train", "--data", "moons", "--objective", objective, "--out", str(out), "--steps", "40",
                 "--batch-size", "64", "--device", "cpu", "--no-progress"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.objective_name == objective
    assert main(["sample", "--ckpt", str(out), "--n", "16", "--steps", "4", "--out", str(tmp_path / "s.npy")]) == 0
    assert f"({default})" in capsys.readouterr().out
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (16, 2) and np.isfinite(x).all()
    assert main(["train", "--data", "moons", "--out", str(out), "--resume", "--steps", "50",
                 "--no-progress"]) == 0                                        # resumes with its own objective
    assert load_checkpoint(out).step == 50


def test_cli_objective_errors(tmp_path, capsys):
    out = tmp_path / "flow"
    assert main(["train", "--data", "moons", "--objective", "flow", "--out", str(out), "--steps", "2",
                 "--no-progress"]) == 0
    assert main(["sample", "--ckpt", str(out), "--sampler", "ddim", "--out", str(tmp_path / "a.png")]) == 2
    assert "sampler must be one of 'euler', 'heun'" in capsys.readouterr().err
    assert main(["train", "--data", "moons", "--objective", "edm", "--prediction", "v",
                 "--out", str(tmp_path / "e"), "--no-progress"]) == 2
    assert main(["train", "--data", "digits", "--stream", "--out", str(tmp_path / "d")]) == 2
    assert "--stream reads folder" in capsys.readouterr().err


def test_cli_streams_a_folder_with_flips(folder, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", "folder", "--data-path", str(folder), "--image-size", "6", "--stream",
                 "--hflip", "--num-workers", "0", "--preset", "digits-tiny", "--steps", "3", "--batch-size", "8",
                 "--T", "20", "--out", str(out), "--no-progress"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.train.hflip and ckpt.sample_shape == (3, 6, 6)


def test_a_few_hundred_images_get_a_warning():
    x = torch.rand(300, 1, 4, 4) * 2 - 1
    with pytest.warns(UserWarning, match="only 300 images"):
        td.Trainer(tiny_unet(1, 4), td.NoiseSchedule.cosine(50), Dataset(x), config())
