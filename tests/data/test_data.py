"""Data loaders (digits, Fashion-MNIST, .npz, image folders), preprocessing and their errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from fliqs_compiler.data import sources as D
from fliqs_compiler.data.sources import load_data
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import InputSpec

GREY8 = InputSpec("x", (1, 1, 8, 8))


def test_digits_split_and_normalisation():
    d = load_data("digits", GREY8, holdout=0.25, seed=3)
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_train.dtype == torch.float32
    assert len(d.x_train) + len(d.x_val) == 1797 and len(d.x_val) == round(0.25 * 1797)
    assert d.num_classes == 10 and d.labeled and d.y_train.dtype == torch.int64
    assert abs(float(d.x_train.mean())) < 1e-4 and float(d.x_train.std()) == pytest.approx(1.0, abs=1e-3)
    assert d.x_test is d.x_val  # no official test split
    again = load_data("digits", GREY8, holdout=0.25, seed=3)
    assert torch.equal(d.x_val, again.x_val)
    other = load_data("digits", GREY8, holdout=0.25, seed=4)
    assert not torch.equal(d.y_val, other.y_val)


def test_resize_channels_and_explicit_stats():
    d = load_data("digits", InputSpec("x", (1, 3, 16, 16)), mean=0.5, std=0.25)
    assert d.x_train.shape[1:] == (3, 16, 16)
    assert torch.equal(d.x_train[:, 0], d.x_train[:, 2])  # grey replicated to 3 channels
    raw = load_data("digits", GREY8, mean=0.0, std=1.0)
    assert float(raw.x_train.min()) >= 0.0 and float(raw.x_train.max()) <= 1.0


def test_npz_labeled_and_extra_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 12, 12, 3), dtype=np.uint8)  # NHWC photos
    y = np.arange(40) % 4
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y, names=np.array(["a"] * 40), extra=np.zeros(3))
    d = load_data(str(p), InputSpec("img", (2, 3, 8, 8)), holdout=0.5)
    assert d.x_train.shape == (20, 3, 8, 8) and d.num_classes == 4
    d10 = load_data(str(p), InputSpec("img", (2, 3, 8, 8)), num_classes=10)
    assert d10.num_classes == 10


def test_npz_unlabeled_preprocessed_floats_kept(tmp_path):
    x = np.random.default_rng(1).normal(size=(10, 1, 8, 8)).astype(np.float32)
    p = tmp_path / "u.npz"
    np.savez(p, x=x)
    d = load_data(str(p), GREY8)
    assert not d.labeled and d.y_train is None and d.num_classes is None
    got = torch.cat([d.x_train, d.x_val])
    assert torch.allclose(got.sort(0).values, torch.from_numpy(x).sort(0).values)  # not renormalised


def test_npz_flat_vectors(tmp_path):
    p = tmp_path / "v.npz"
    np.savez(p, x=np.ones((6, 4, 5), dtype=np.float32))
    d = load_data(str(p), InputSpec("x", (1, 20)))
    assert d.x_train.shape[1:] == (20,)


@pytest.mark.parametrize("arrays,needle", [
    ({"z": np.zeros((4, 8, 8))}, "no array named 'x'"),
    ({"x": np.zeros((0, 8, 8))}, "no samples"),
    ({"x": np.full((4, 8, 8), np.nan)}, "NaN"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0, 1, 2, 12])}, "labels must lie in [0, 9]"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0, -1, 2, 1])}, "labels must lie"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0, 1])}, "one integer label per sample"),
    ({"x": np.zeros((4, 8, 8)), "y": np.array([0.5, 1, 2, 1])}, "integer class labels"),
    ({"x": np.array([["a"] * 8] * 4)}, "numeric"),
    ({"x": np.zeros((4, 7))}, "the model wants images"),
    ({"x": np.zeros((4, 2, 8, 8))}, "channels"),
])
def test_npz_errors(tmp_path, arrays, needle):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(FliqsError) as e:
        load_data(str(p), GREY8, num_classes=10)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_unknown_and_missing(tmp_path):
    with pytest.raises(FliqsError, match="unknown data"):
        load_data("imagenet", GREY8)
    with pytest.raises(FliqsError, match="file not found"):
        load_data(str(tmp_path / "nope.npz"), GREY8)
    with pytest.raises(FliqsError, match="holdout"):
        load_data("digits", GREY8, holdout=1.5)
    with pytest.raises(FliqsError, match="std must be positive"):
        load_data("digits", GREY8, std=0.0)


def _png(path, value, size=(10, 10), mode="RGB"):
    Image.new(mode, size, value).save(path)


def test_image_folder_labeled_and_flat(tmp_path):
    root = tmp_path / "imgs"
    for label, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        (root / label).mkdir(parents=True)
        for i in range(3):
            _png(root / label / f"{i}.png", colour, size=(10 + i, 12))  # sizes differ
    d = load_data(str(root), InputSpec("x", (1, 3, 8, 8)), holdout=0.34)
    assert d.num_classes == 2 and len(d.x_train) + len(d.x_val) == 6
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        _png(flat / f"{i}.jpg", (i * 40,) * 3)
    u = load_data(str(flat), GREY8)
    assert not u.labeled and u.x_train.shape[1:] == (1, 8, 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FliqsError, match="no images found"):
        load_data(str(empty), GREY8)
    (flat / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FliqsError, match="not a readable image"):
        load_data(str(flat), GREY8)


def test_fashion_mnist_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FliqsError) as e:
        load_data("fashion-mnist", InputSpec("x", (1, 1, 28, 28)))
    assert "apt-get install -y dataset-fashion-mnist" in str(e.value)


@pytest.mark.skipif(not (D.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist not installed")
def test_fashion_mnist(monkeypatch):
    d = load_data("fashion-mnist", InputSpec("x", (1, 1, 28, 28)), limit=1000)
    assert d.x_train.shape == (800, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert d.num_classes == 10 and d.x_test is not d.x_val
