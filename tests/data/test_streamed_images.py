"""Streamed image folders: decoded per batch (in this process or by DataLoader workers) into the
very values, rows and labels the in-memory path holds; the trainer's batches are the same for
a seed, its data-parallel shares read only their rows, and a broken image is a one-line error."""
import numpy as np
import pytest
import torch
from PIL import Image

from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.data import sources as D
from fliqs_compiler.data.sources import StreamedImages, load_data
from fliqs_compiler.ir.graph import InputSpec
from fliqs_compiler.search.trainer import TrainOptions, WeightTrainer

RGB16 = InputSpec("x", (1, 3, 16, 16))


def _folder(root, per_class=6, classes=("a", "b", "c"), seed=0):
    """Noise PNGs of several sizes (some resized to the first one's size, all to the model's)."""
    rng = np.random.default_rng(seed)
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            h, w = (20, 24) if i % 3 else (13, 17)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("imgs"))


def _bits_equal(a, b):
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.mark.parametrize("spec", [RGB16, InputSpec("x", (1, 1, 8, 8))])
def test_streamed_splits_equal_the_in_memory_ones(folder, spec):
    mem = load_data(str(folder), spec, stream=False)
    st = load_data(str(folder), spec, stream=True, workers=0)
    assert isinstance(st.x_train, StreamedImages) and isinstance(mem.x_train, torch.Tensor)
    assert st.x_train.shape == mem.x_train.shape and len(st.x_val) == len(mem.x_val)
    assert torch.equal(st.y_train, mem.y_train) and torch.equal(st.y_val, mem.y_val)
    assert st.num_classes == mem.num_classes == 3 and st.x_test is st.x_val
    if spec.shape[1] == 3:  # ImageNet statistics: bit for bit
        assert _bits_equal(st.x_train[:], mem.x_train) and _bits_equal(st.x_val[:], mem.x_val)
    else:  # a 1-channel model's statistics: one streamed pass in float64
        torch.testing.assert_close(st.x_train[:], mem.x_train, rtol=0, atol=1e-5)
    idx = torch.tensor([5, 0, 5, 3])
    assert _bits_equal(st.x_train[idx], st.x_train[:][idx])
    assert _bits_equal(st.x_train[2], st.x_train[:][2])


def test_trainer_batches_equal_for_a_seed_with_workers(folder):
    mem = load_data(str(folder), RGB16, stream=False)
    st = load_data(str(folder), RGB16, stream=True, workers=2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    trainers = [WeightTrainer(model, d, TrainOptions(batch_size=5)) for d in (mem, st)]
    gens = [torch.Generator().manual_seed(7) for _ in trainers]
    for _ in range(3):  # every rank of a data-parallel run reads its share of the same rows
        (xm, ym, im), (xs, ys, is_) = (t.batch("train", 5, g) for t, g in zip(trainers, gens))
        assert torch.equal(im, is_) and torch.equal(ym, ys) and _bits_equal(xm, xs)
        share = is_[2:5]
        assert _bits_equal(trainers[1].rows("train", share)[0], xm[2:5])
    assert torch.equal(gens[0].get_state(), gens[1].get_state())  # the stream resumes alike


def test_size_rule_and_broken_image(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs", per_class=2, classes=("a", "b"))
    assert isinstance(load_data(str(root), RGB16).x_train, torch.Tensor)
    monkeypatch.setattr(D, "STREAM_ABOVE_BYTES", 4 * 3 * 16 * 16 * 3)  # fewer bytes than 4 samples
    d = load_data(str(root), RGB16, workers=2)
    assert isinstance(d.x_train, StreamedImages) and "streamed" in d.description
    (root / "a" / "9.png").write_bytes(b"not a png")  # found when its batch is decoded
    for workers in (0, 2):
        d = load_data(str(root), RGB16, stream=True, workers=workers)
        with pytest.raises(FliqsError, match=r"9\.png: not a readable image") as e:
            d.x_train[:], d.x_val[:]
        assert "\n" not in str(e.value)
