"""Datasets: built-in sets and the on-disk loaders, on small files these tests write themselves."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tinyddpm import DATASETS, Dataset, load_dataset, toy_mixture
from tinyddpm.data.datasets import batches

# --- Dataset -------------------------------------------------------------------------------------


def test_dataset_properties_and_subset():
    x = torch.linspace(-1, 1, 6 * 3 * 4 * 4).reshape(6, 3, 4, 4)
    d = Dataset(x, torch.arange(6) % 3, 3, "toy")
    assert len(d) == 6 and d.shape == (3, 4, 4) and d.is_image
    s = d.subset(torch.tensor([4, 1]))
    assert torch.equal(s.x, x[[4, 1]]) and s.labels.tolist() == [1, 1] and s.num_classes == 3 and s.name == "toy"
    p = Dataset(torch.randn(5, 2) * 10)          # points may leave [-1, 1]
    assert not p.is_image and p.shape == (2,) and p.subset(slice(0, 2)).labels is None


def test_uint8_pixels_are_stored_as_uint8_and_read_as_floats():
    p = torch.arange(2 * 3 * 4 * 4, dtype=torch.int64).reshape(2, 3, 4, 4).to(torch.uint8) * 2  # 0..190, even
    d = Dataset(p, torch.tensor([1, 0]), 2, "px")
    assert d.pixels is p and d.nbytes() == 96 and d.nbytes(torch.float32) == 384
    assert d.shape == (3, 4, 4) and d.is_image and len(d) == 2
    expected = p.numpy().astype(np.float32) / 127.5 - 1                 # the numpy formula, computed apart
    assert d.x.dtype == torch.float32 and torch.equal(d.x, torch.from_numpy(expected))
    assert torch.equal(d.x_at(torch.tensor([1])), d.x[[1]])
    s = d.subset(torch.tensor([1]))
    assert s.pixels.dtype == torch.uint8 and torch.equal(s.pixels, p[[1]]) and s.labels.tolist() == [0]
    extremes = Dataset(torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 1, 2))
    assert extremes.x.flatten().tolist() == [-1.0, 1.0]
    f = Dataset(torch.zeros(3, 2))
    assert f.pixels is None and f.nbytes() == 24
    with pytest.raises(ValueError, match=r"uint8 pixels must have shape \(N, C, H, W\)"):
        Dataset(torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(AttributeError, match="read-only"):
        d.name = "other"
    again = pickle.loads(pickle.dumps(d))
    assert torch.equal(again.pixels, p) and again.labels.tolist() == [1, 0] and again.name == "px"


def test_dataset_validation():
    with pytest.raises(TypeError, match="float32 tensor .or uint8 pixels"):
        Dataset(torch.zeros(2, 1, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        Dataset(torch.full((2, 1, 2, 2), 1.5))
    with pytest.raises(ValueError, match="shape"):
        Dataset(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        Dataset(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="together"):
        Dataset(torch.zeros(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \(N,\) = \(2,\)"):
        Dataset(torch.zeros(2, 2), torch.tensor([0, 1, 1]), 2)
    with pytest.raises(ValueError, match="int64"):
        Dataset(torch.zeros(2, 2), torch.tensor([0, 1], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Dataset(torch.zeros(2, 2), torch.tensor([0, 2]), 2)


def test_batches_cover_every_sample_once():
    d = Dataset(torch.arange(10.0)[:, None], torch.arange(10), 10)
    got = list(batches(d, 4, torch.Generator().manual_seed(0)))
    assert [len(x) for x, _ in got] == [4, 4, 2]
    xs, ys = torch.cat([x for x, _ in got])[:, 0], torch.cat([y for _, y in got])
    assert sorted(xs.long().tolist()) == list(range(10)) and torch.equal(xs.long(), ys)
    assert [len(x) for x, _ in batches(d, 4, drop_last=True)] == [4, 4]


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="'digits'.*'moons'.*'cifar10'.*'folder'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be one of 'train', 'test'"):
        load_dataset("digits", split="val")
    assert set(DATASETS) == {"digits", "moons", "swiss_roll", "mixture", "mnist", "fashion_mnist", "cifar10", "folder"}


# --- digits --------------------------------------------------------------------------------------


def test_digits_split_is_a_fixed_stratified_partition():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1500, 297)
    for d in (train, test):
        assert d.shape == (1, 8, 8) and d.x.dtype == torch.float32 and d.num_classes == 10
        assert float(d.x.min()) == -1.0 and float(d.x.max()) == 1.0
        assert torch.equal((d.x + 1) * 8, ((d.x + 1) * 8).round())          # 17 grey levels 0..16
        assert sorted(d.labels.unique().tolist()) == list(range(10))
    # stratified: every class has 16.5 % of its digits in the test split, ±1
    full = load_digits()
    per_class = np.bincount(full.target, minlength=10)
    assert np.abs(np.bincount(test.labels.numpy(), minlength=10) - per_class * 297 / 1797).max() < 1
    # a partition: train + test is the full set exactly once (as (pixels, label) rows)
    def rows(x, y):
        return Counter(zip(map(bytes, x.reshape(len(x), -1).astype(np.int8)), y.tolist(), strict=True))
    to_pixels = lambda d: ((d.x + 1) * 8).round().numpy()
    assert rows(to_pixels(train), train.labels) + rows(to_pixels(test), test.labels) == rows(full.images, full.target)
    # deterministic, and independent of the user's seed
    assert torch.equal(load_dataset("digits", split="test", seed=5).x, test.x)


def test_digits_subset_n_is_seeded():
    a, b = load_dataset("digits", n=100, seed=1), load_dataset("digits", n=100, seed=1)
    assert len(a) == 100 and torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.x, load_dataset("digits", n=100, seed=2).x)
    with pytest.raises(ValueError, match="only 297"):
        load_dataset("digits", split="test", n=298)


# --- toy 2-D sets --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["moons", "swiss_roll", "mixture"])
def test_toy_sets_are_seeded(name):
    a = load_dataset(name, n=500, seed=3)
    assert a.x.shape == (500, 2) and a.x.dtype == torch.float32 and not a.is_image
    assert torch.equal(a.x, load_dataset(name, n=500, seed=3).x)
    assert not torch.equal(a.x, load_dataset(name, n=500, seed=4).x)
    assert not torch.equal(a.x, load_dataset(name, n=500, seed=3, split="test").x)
    assert abs(float(a.x.mean())) < 0.3 and (a.x.std(0) > 0.5).all() and (a.x.std(0) < 1.5).all()  # ~unit spread


def test_moons_geometry_matches_labels():
    d = load_dataset("moons", n=2000)
    p = d.x.double() * 0.7 + torch.tensor([0.5, 0.25], dtype=torch.float64)   # undo the scaling
    r_outer = p.norm(dim=1)                                                    # upper moon: unit circle at 0
    r_inner = (p - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1)  # lower moon: unit circle at (1, .5)
    r = torch.where(d.labels == 0, r_outer, r_inner)
    assert d.num_classes == 2 and set(d.labels.tolist()) == {0, 1}
    assert abs(float(r.mean()) - 1) < 0.02 and float((r - 1).abs().max()) < 0.5   # noise σ = 0.08


def test_mixture_matches_toy_mixture():
    gm = toy_mixture()
    d = load_dataset("mixture", n=20_000, seed=0)
    assert d.num_classes == gm.K == 8 and gm.D == 2
    freq = torch.bincount(d.labels, minlength=8).double() / len(d)
    assert (freq - gm.weights).abs().max() < 0.015                     # 3.5 σ of a frequency at n = 20k
    mean = (gm.weights[:, None] * gm.means).sum(0)
    assert (d.x.double().mean(0) - mean).abs().max() < 0.04
    # each point sits near its own component: |x - μ_k| / σ is a 2-D standard normal radius
    z = (d.x.double() - gm.means[d.labels]) / gm.stds[d.labels]
    assert abs(float((z**2).sum(1).mean()) - 2) < 0.1


# --- MNIST / Fashion-MNIST IDX files -------------------------------------------------------------


def write_idx(path, array: np.ndarray, magic: int, gz: bool = False, cut: int = 0) -> None:
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    data = data[: len(data) - cut]
    path.write_bytes(gzip.compress(data) if gz else data)


def write_mnist(folder, n_train=5, n_test=3, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        ext = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images, 0x803, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels, 0x801, gz)
        out[prefix] = images, labels
    return out


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_loader(tmp_path, gz, name):
    arrays = write_mnist(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        d = load_dataset(name, tmp_path, split=split)
        images, labels = arrays[prefix]
        assert d.x.shape == (len(images), 1, 28, 28) and d.name == name and d.num_classes == 10
        assert torch.equal(d.x[:, 0], torch.from_numpy(images.astype(np.float32) / 127.5 - 1))
        assert d.x[0, 0, 0, 0] == -1 and d.x[0, 0, 0, 1] == 1
        assert d.labels.tolist() == labels.tolist()
        assert d.pixels.dtype == torch.uint8 and torch.equal(d.pixels[:, 0], torch.from_numpy(images))


def test_idx_torchvision_layout(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", gz=True)
    assert load_dataset("mnist", tmp_path).labels.tolist() == arrays["train"][1].tolist()


def test_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope is not a folder"):
        load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(ValueError, match="needs path="):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path)
    write_mnist(tmp_path, gz=True)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    # wrong magic: a label file where the images should be
    write_idx(images, np.zeros(5, np.uint8), 0x801, gz=True)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: not an IDX image file "
                                         r"\(magic 0x00000803 expected, got 0x00000801\)"):
        load_dataset("mnist", tmp_path)
    # truncated data, and a truncated gzip stream
    write_idx(images, np.zeros((5, 28, 28), np.uint8), 0x803, gz=True, cut=10)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: truncated or corrupt IDX image file: "
                                         r"header says 5×28×28 = 3920 bytes of data, file holds 3910"):
        load_dataset("mnist", tmp_path)
    write_idx(images, np.zeros((5, 28, 28), np.uint8), 0x803, gz=True)
    images.write_bytes(images.read_bytes()[:-12])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: corrupt or truncated gzip file"):
        load_dataset("mnist", tmp_path)
    write_idx(images, np.zeros((5, 28, 28), np.uint8), 0x803, gz=True)
    write_idx(labels, np.zeros(4, np.uint8), 0x801, gz=True)
    with pytest.raises(ValueError, match="has 5 images but train-labels-idx1-ubyte.gz has 4 labels"):
        load_dataset("mnist", tmp_path)
    labels.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="not an IDX label file .*only 2 bytes"):
        load_dataset("mnist", tmp_path)


# --- CIFAR-10 python batches ---------------------------------------------------------------------


def write_cifar(folder, n=4, protocol=2, bytes_keys=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches_ = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        names = [f"{i}.png" for i in range(n)]
        d = {"batch_label": "training batch", "data": data, "labels": labels, "filenames": names}
        if bytes_keys:                    # what the real (Python 2) pickles hold
            d = {k.encode(): v for k, v in d.items()}
        (folder / name).write_bytes(pickle.dumps(d, protocol=protocol))
        batches_[name] = data, labels
    return batches_


@pytest.mark.parametrize("protocol, bytes_keys, sub", [(2, True, False), (5, False, True)])
def test_cifar_loader(tmp_path, protocol, bytes_keys, sub):
    written = write_cifar(tmp_path / "cifar-10-batches-py" if sub else tmp_path, protocol=protocol,
                          bytes_keys=bytes_keys)
    train, test = load_dataset("cifar10", tmp_path), load_dataset("cifar10", tmp_path, split="test")
    assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (4, 3, 32, 32) and train.num_classes == 10
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    # a row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major
    assert train.x[7, 1, 2, 3] == float(data[7, 1024 + 2 * 32 + 3]) / 127.5 - 1
    assert torch.equal(train.x, torch.from_numpy(data.reshape(20, 3, 32, 32).astype(np.float32) / 127.5 - 1))
    assert train.labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert test.labels.tolist() == written["test_batch"][1]
    assert train.pixels.dtype == torch.uint8 and train.nbytes() == 20 * 3072      # stored as uint8: 1/4 of float32


def py2_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way Python 2 / numpy 1 wrote the real CIFAR files: str (not bytes) opcodes,
    ``numpy.core.multiarray._reconstruct``, written opcode by opcode."""
    n = data.shape[0]
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R("
             b"K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", 3072) + b"\x86"
             b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             b"\x89T" + struct.pack("<I", data.size) + data.tobytes() + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(U\x04data" + array + b"U\x06labels" + label_list + b"u."


def test_cifar_python2_pickles(tmp_path):
    rng = np.random.default_rng(1)
    data = {name: rng.integers(0, 256, (3, 3072), dtype=np.uint8) for name in
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    for name, d in data.items():
        (tmp_path / name).write_bytes(py2_pickle(d, [1, 2, 9]))
    test = load_dataset("cifar10", tmp_path, split="test")
    expected = data["test_batch"].reshape(3, 3, 32, 32).astype(np.float32) / 127.5 - 1
    assert torch.equal(test.x, torch.from_numpy(expected))
    assert test.labels.tolist() == [1, 2, 9] and len(load_dataset("cifar10", tmp_path)) == 15


class _Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a hostile file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_cifar_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    hostile = pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=2)
    pickle.loads(hostile)                                  # plain pickle really does run it...
    assert marker.exists()
    marker.unlink()
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(hostile)
    with pytest.raises(ValueError, match=r"data_batch_3: refused to load (io|builtins)\.open"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()                             # ...ours refused before anything ran
    # an allow-list, not a block-list: even a harmless non-numpy class is refused
    from collections import OrderedDict
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(OrderedDict(data=1)))
    with pytest.raises(ValueError, match=r"refused to load collections\.OrderedDict"):
        load_dataset("cifar10", tmp_path)


def test_cifar_errors(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_5").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_5 not found"):
        load_dataset("cifar10", tmp_path)
    write_cifar(tmp_path)
    good = (tmp_path / "data_batch_2").read_bytes()
    (tmp_path / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="data_batch_2: corrupt or truncated pickle"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="data_batch_2: not a CIFAR-10 python batch.*got a list"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"data is uint8 \(2, 100\)"):
        load_dataset("cifar10", tmp_path)


# --- a folder of images --------------------------------------------------------------------------


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_without_classes(tmp_path):
    half = np.zeros((32, 64, 3), np.uint8)
    half[:, 32:] = 255                       # 64 wide, 32 tall: left half black, right half white
    _png(tmp_path / "a.png", half)
    _png(tmp_path / "b.png", np.full((50, 40, 3), (255, 0, 0), np.uint8))
    d = load_dataset("folder", tmp_path)
    assert d.x.shape == (2, 3, 32, 32) and d.labels is None and d.name == "folder"
    assert d.pixels.dtype == torch.uint8
    # centre crop of 64 -> 32 columns keeps columns 16..47: black then white, split in the middle
    assert (d.x[0, :, :, :16] == -1).all() and (d.x[0, :, :, 16:] == 1).all()
    assert (d.x[1, 0] == 1).all() and (d.x[1, 1:] == -1).all()         # resized solid red stays solid red
    g = load_dataset("folder", tmp_path, image_size=8, channels=1)
    assert g.x.shape == (2, 1, 8, 8)
    assert abs(float(g.x[1].mean()) - (round(0.299 * 255) / 127.5 - 1)) < 0.01   # PIL's ITU-R 601 grey of red


def test_folder_with_class_subfolders(tmp_path):
    for cls, value in (("dogs", 200), ("cats", 10)):
        for i in range(2):
            _png(tmp_path / cls / f"{i}.png", np.full((16, 16), value, np.uint8))
    d = load_dataset("folder", tmp_path, image_size=16, channels=1)
    assert d.num_classes == 2 and d.labels.tolist() == [0, 0, 1, 1]       # classes sorted: cats, dogs
    assert torch.allclose(d.x.mean((1, 2, 3)), torch.tensor([10, 10, 200, 200]) / 127.5 - 1)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image files"):
        load_dataset("folder", tmp_path)
    _png(tmp_path / "top.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "cls" / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="both at its top level"):
        load_dataset("folder", tmp_path)
    (tmp_path / "top.png").write_bytes(b"not a png at all")
    (tmp_path / "cls" / "x.png").unlink()
    with pytest.raises(ValueError, match="top.png: not a readable image file"):
        load_dataset("folder", tmp_path)
    with pytest.raises(ValueError, match="no test split"):
        load_dataset("folder", tmp_path, split="test")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_dataset("folder", tmp_path, channels=2)


def test_toy_default_size():
    assert len(load_dataset("swiss_roll")) == 10_000 and len(load_dataset("moons", n=7)) == 7
