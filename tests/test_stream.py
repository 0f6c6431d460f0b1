"""Batches from memory and streamed from disk: order, resumption, sharding, flips, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tinyddpm.data import Dataset, IdxStream, load_dataset, make_batch_source, pixels_to_float
from tinyddpm.data.loader import EpochOrder, dist_rank_world


def coded_pixels(n: int, size: int = 4, channels: int = 1) -> torch.Tensor:
    """uint8 images (n, C, size, size) whose first two pixels spell the index i, and whose rows are all
    different from their mirror image (so a flip is visible)."""
    rng = np.random.default_rng(0)
    p = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    p[:, 0, 0, 0], p[:, 0, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    p[:, 0, 0, -1] = 255 - p[:, 0, 0, 0]                      # never equal to pixel 0 unless 127.5: mirror differs
    return torch.from_numpy(p)


def decode_index(x: torch.Tensor) -> list[int]:
    p = ((x + 1) * 127.5).round().long()
    return (p[:, 0, 0, 0] * 256 + p[:, 0, 0, 1]).tolist()


def take(src, k):
    return [next(src) for _ in range(k)]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, u) and ((y is None and v is None) or torch.equal(y, v))
        for (x, y), (u, v) in zip(a, b, strict=True))


# --- the order ------------------------------------------------------------------------------------


def test_epoch_order_visits_every_sample_once_per_epoch_and_straddles():
    o = EpochOrder(10, 4, seed=3, hflip=False)
    seen = torch.cat([o.next()[0] for _ in range(5)]).tolist()     # 20 entries = two epochs, batch 3 straddles
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]                                   # a new permutation each epoch
    assert (o.epoch, o.position) == (2, 0)
    again = EpochOrder(10, 4, seed=3, hflip=False)
    assert torch.cat([again.next()[0] for _ in range(5)]).tolist() == seen
    other = EpochOrder(10, 4, seed=4, hflip=False)
    assert torch.cat([other.next()[0] for _ in range(5)]).tolist() != seen
    big = EpochOrder(3, 7, seed=0, hflip=False)                     # batch larger than the set
    first = big.next()[0].tolist()
    assert len(first) == 7 and sorted(first[:3]) == [0, 1, 2] and sorted(first[3:6]) == [0, 1, 2]


def test_in_memory_uint8_batches_are_exact_and_cover_each_epoch():
    pixels = coded_pixels(600)
    data = Dataset(pixels, torch.arange(600) % 7, 7)
    src = make_batch_source(data, 64, seed=1)
    xs, ys = zip(*take(src, 600 // 64 + 1), strict=True)   # 640 entries: the first epoch and 40 more
    idx = sum((decode_index(x) for x in xs), [])
    assert sorted(idx[:600]) == list(range(600))
    for x, y in zip(xs, ys, strict=True):
        i = decode_index(x)
        assert x.dtype == torch.float32 and torch.equal(x, pixels_to_float(pixels[i]))
        assert torch.equal(y, torch.tensor(i) % 7)
    assert src.state_dict()["epoch"] == 1 and src.state_dict()["position"] == 40


def test_float_and_point_data():
    pts = Dataset(torch.randn(1000, 2))
    x, y = next(make_batch_source(pts, 16))
    assert x.shape == (16, 2) and y is None
    with pytest.raises(ValueError, match=r"hflip=True needs images \(C, H, W\).*\(2,\)"):
        make_batch_source(pts, 16, hflip=True)


@pytest.mark.parametrize("stream", [False, True])
def test_resume_continues_with_the_same_batches(tmp_path, stream):
    data = folder_of_pngs(tmp_path, 520, classes=True) if stream else Dataset(coded_pixels(520, 8, 3))
    if stream:
        data = load_dataset("folder", tmp_path, image_size=8, stream=True)
    kw = {"num_workers": 2} if stream else {}
    src = make_batch_source(data, 48, seed=5, hflip=True, **kw)
    take(src, 7)                                                    # 336 of 520: mid-epoch
    state = src.state_dict()
    reference = take(src, 8)                                        # crosses into epoch 1
    src.close()
    resumed = make_batch_source(data, 48, seed=5, hflip=True, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))          # survives a JSON round trip
    assert same_batches(take(resumed, 8), reference)
    fresh = make_batch_source(data, 48, seed=5, hflip=True, **kw)   # ...and is not just "any" batches
    assert not same_batches(take(fresh, 8), reference)
    resumed.close(), fresh.close()


def test_sharding_splits_each_global_batch_and_survives_a_new_world_size():
    data = Dataset(coded_pixels(600), torch.arange(600) % 3, 3)
    one = take(make_batch_source(data, 24, seed=2, hflip=True, rank=0, world_size=1), 30)
    shards = [take(make_batch_source(data, 24, seed=2, hflip=True, rank=r, world_size=3), 30) for r in range(3)]
    for k in range(30):
        assert torch.equal(torch.cat([s[k][0] for s in shards]), one[k][0])
        assert torch.equal(torch.cat([s[k][1] for s in shards]), one[k][1])
    # a run saved with 3 processes resumes on 2 from the same global position
    src = make_batch_source(data, 24, seed=2, hflip=True, rank=1, world_size=3)
    take(src, 10)
    two = [make_batch_source(data, 24, seed=2, hflip=True, rank=r, world_size=2) for r in range(2)]
    for s in two:
        s.load_state_dict(src.state_dict())
    for k in range(10, 30):
        assert torch.equal(torch.cat([next(s)[0] for s in two]), one[k][0])


def test_rank_and_world_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dist_rank_world() == (2, 4) and dist_rank_world(0, 1) == (0, 1)
    src = make_batch_source(Dataset(coded_pixels(600)), 16)
    assert next(src)[0].shape[0] == 4
    with pytest.raises(ValueError, match="divisible by the number of processes 4"):
        make_batch_source(Dataset(coded_pixels(600)), 10)
    with pytest.raises(ValueError, match="rank must be < world_size = 2"):
        dist_rank_world(2, 2)


def test_hflip_mirrors_half_the_samples_and_nothing_else():
    pixels = coded_pixels(600, 4, 3)
    src = make_batch_source(Dataset(pixels), 100, seed=0, hflip=True)
    flipped = total = 0
    for x, _ in take(src, 6):
        p = ((x + 1) * 127.5).round().to(torch.uint8)
        mirrored = p.flip(-1)
        for img, mir in zip(p, mirrored, strict=True):
            i = int(img[0, 0, 0]) * 256 + int(img[0, 0, 1])
            j = int(mir[0, 0, 0]) * 256 + int(mir[0, 0, 1])
            if i < 600 and torch.equal(img, pixels[i]):
                total += 1
            else:                                   # then it must be exactly the mirror of image j
                assert torch.equal(mir, pixels[j])
                flipped += 1
                total += 1
    assert total == 600 and 240 < flipped < 360     # Binomial(600, 1/2): ±5 σ


def test_errors_and_small_set_warning(tmp_path):
    with pytest.warns(UserWarning, match="only 100 images.*reproduce"):
        make_batch_source(Dataset(coded_pixels(100)), 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_batch_source(Dataset(torch.randn(100, 2)), 10)       # points: no warning
    src = make_batch_source(Dataset(coded_pixels(600)), 10, seed=1)
    with pytest.raises(ValueError, match="saved state has seed = 2, this source has 1"):
        src.load_state_dict({"epoch": 0, "position": 0, "seed": 2})
    with pytest.raises(ValueError, match="position must be < the dataset size 600"):
        src.load_state_dict({"epoch": 0, "position": 600})
    with pytest.raises(TypeError, match="tinyddpm Dataset"):
        make_batch_source(torch.zeros(3, 2), 2)
    with pytest.raises(TypeError, match="hflip must be True or False"):
        make_batch_source(Dataset(coded_pixels(600)), 2, hflip=1)


# --- streaming from disk -------------------------------------------------------------------------


def folder_of_pngs(root, n: int, size: int = 8, classes: bool = False) -> np.ndarray:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        sub = root / f"c{i % 3}" if classes else root
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(sub / f"{i:05d}.png", compress_level=0)
    return images


def test_streamed_folder_matches_the_in_memory_folder(tmp_path):
    folder_of_pngs(tmp_path, 510, classes=True)
    mem = load_dataset("folder", tmp_path, image_size=8)
    assert mem.pixels.dtype == torch.uint8 and mem.pixels.shape == (510, 3, 8, 8)
    st = load_dataset("folder", tmp_path, image_size=8, stream=True)
    assert len(st) == 510 and st.shape == (3, 8, 8) and st.num_classes == 3 and torch.equal(st.labels, mem.labels)
    assert st.nbytes(torch.float32) == 510 * 192 * 4
    assert torch.equal(st.x_at(torch.tensor([4, 0, 509])), mem.x_at(torch.tensor([4, 0, 509])))
    with pytest.raises(AttributeError, match="no in-memory x; read batches through"):
        _ = st.x
    a = take(make_batch_source(mem, 32, seed=7, hflip=True), 20)
    b_src = make_batch_source(st, 32, seed=7, hflip=True, num_workers=2)
    assert same_batches(take(b_src, 20), a)
    b_src.close()
    with pytest.raises(ValueError, match="n= .* not available with stream=True"):
        load_dataset("folder", tmp_path, stream=True, n=3)
    with pytest.raises(ValueError, match="'cifar10' fits in memory"):
        load_dataset("cifar10", tmp_path, stream=True)


def test_streamed_idx_matches_in_memory(tmp_path):
    from test_data import write_mnist

    write_mnist(tmp_path, n_train=520, n_test=3)
    mem = load_dataset("mnist", tmp_path)
    st = load_dataset("mnist", tmp_path, stream=True)
    assert isinstance(st, IdxStream) and st.shape == (1, 28, 28) and torch.equal(st.labels, mem.labels)
    assert all(torch.equal(st[i], mem.pixels[i]) for i in (0, 7, 519))
    a = take(make_batch_source(mem, 40, seed=1), 15)
    src = make_batch_source(st, 40, seed=1, num_workers=2)
    assert same_batches(take(src, 15), a)
    src.close()
    write_mnist(tmp_path / "gz", gz=True)
    with pytest.raises(FileNotFoundError, match="uncompressed"):
        load_dataset("mnist", tmp_path / "gz", stream=True)
    with pytest.raises(ValueError, match="gzip file cannot be streamed"):
        IdxStream(next((tmp_path / "gz").glob("train-images*")))


MEMORY_PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from tinyddpm.data import load_dataset, make_batch_source

    def hwm_kib(pid):  # peak resident set size of a process
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))

    def children():
        me, out = str(os.getpid()), []
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    with open(f"/proc/{p}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[1] == me:
                            out.append(int(p))
                except OSError:
                    pass
        return out

    data = load_dataset("folder", sys.argv[1], image_size=int(sys.argv[2]), stream=True)
    src = make_batch_source(data, 50, seed=0, num_workers=2)
    seen, checksum = 0, 0.0
    for _ in range(4):  # batches come from the workers in turn: after 4, each worker has decoded, collated
        x, _ = next(src)  # and sent batches, so its one-off set-up (imports, buffers) is in the baseline
        seen += len(x); checksum += float(x.sum())
    workers = children()
    main0, work0 = hwm_kib(os.getpid()), {p: hwm_kib(p) for p in workers}
    while seen < len(data):
        x, _ = next(src)
        seen += len(x); checksum += float(x.sum())
    growth = [hwm_kib(os.getpid()) - main0] + [hwm_kib(p) - work0[p] for p in workers]
    print(json.dumps({"seen": seen, "workers": len(workers), "growth_kib": growth,
                      "float_kib": data.nbytes(torch.float32) // 1024, "uint8_kib": data.nbytes() // 1024}))
    src.close()
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from /proc (Linux)")
def test_streaming_a_folder_keeps_memory_bounded(tmp_path):
    """3,000 PNGs of 48×48 RGB: 81 MiB as float32, 20 MiB even as uint8. One full epoch through two
    workers must not raise the peak RSS of the main process or of any worker by more than 8 MiB (a few
    batches), so no process ever holds the set, in either dtype."""
    folder_of_pngs(tmp_path / "imgs", 3000, size=48)
    script = tmp_path / "probe.py"
    script.write_text(MEMORY_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: big blocks via mmap,
    # so freed batches go back to the OS (a dynamic threshold made the main process's peak vary 2-7 MiB)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "imgs"), "48"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["seen"] >= 3000 and r["workers"] == 2
    assert r["float_kib"] > 80_000 and r["uint8_kib"] > 20_000
    assert max(r["growth_kib"]) < 8 * 1024, r
