"""Data for search and evaluation: ``load_data(spec, input_spec) -> Dataset``.

Specs (``--data``): ``digits`` (sklearn, 8×8), ``fashion-mnist`` (Debian package
``dataset-fashion-mnist``, IDX gzip files), a ``.npz`` with ``x`` (optional ``y``; other arrays
ignored), or an image folder (class subfolders → labels; flat folder → unlabeled).

Every source is turned into float32 tensors shaped like the model's input (``input_spec.shape``
without its batch dimension): images are resized (bilinear, antialiased), converted between 1 and 3
channels, scaled to [0, 1] when stored as integers, and normalised with ``mean``/``std``. Defaults:
3-channel inputs use the ImageNet statistics, 1-channel inputs the statistics of the training split;
float ``.npz`` data already in the input shape is taken as preprocessed (not normalised) unless
``mean``/``std`` are given. Bad data raises a one-line ``FliqsError`` naming the source.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import InputSpec

__all__ = ["Dataset", "load_data", "SOURCES", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = Path(os.environ.get("FLIQS_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


@dataclass
class Dataset:
    """Train / validation (/ test) tensors in the model's input layout.

    ``y_*`` are int64 labels or None (unlabeled data: the float model is the teacher).
    ``x_test``/``y_test`` hold an official test split where the source has one (Fashion-MNIST),
    else they alias the validation split.
    """

    x_train: torch.Tensor
    y_train: Optional[torch.Tensor]
    x_val: torch.Tensor
    y_val: Optional[torch.Tensor]
    num_classes: Optional[int]
    description: str
    x_test: Optional[torch.Tensor] = None
    y_test: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.x_test is None:
            self.x_test, self.y_test = self.x_val, self.y_val

    @property
    def labeled(self) -> bool:
        return self.y_train is not None

    def __repr__(self):
        return (f"Dataset({self.description!r}, train={tuple(self.x_train.shape)}, "
                f"val={tuple(self.x_val.shape)}, classes={self.num_classes})")


# ---- raw sources: each returns (x ndarray [N, H, W] or [N, H, W, C] or [N, ...], y or None,
#      test (x, y) or None, name, preprocessed) -----------------------------------------------
def _digits(spec: str):
    from sklearn.datasets import load_digits
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64), None, "sklearn digits (8x8)", False


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise FliqsError(f"{path}: not an unsigned-byte IDX file; reinstall dataset-fashion-mnist")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(spec: str):
    files = {k: FASHION_MNIST_DIR / f"{k}.gz" for k in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    missing = [p for p in files.values() if not p.exists()]
    if missing:
        raise FliqsError(f"--data fashion-mnist: {missing[0]} not found; install it with "
                         "`apt-get install -y dataset-fashion-mnist`")
    x = _read_idx(files["train-images-idx3-ubyte"])
    y = _read_idx(files["train-labels-idx1-ubyte"]).astype(np.int64)
    xt = _read_idx(files["t10k-images-idx3-ubyte"])
    yt = _read_idx(files["t10k-labels-idx1-ubyte"]).astype(np.int64)
    return x, y, (xt, yt), "Fashion-MNIST (28x28, official test split as test)", False


def _npz(spec: str):
    path = Path(spec)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files:
                raise FliqsError(f"--data {path}: no array named 'x' (found {', '.join(z.files) or 'none'}); "
                                 "save inputs as x= (and labels as y=)")
            x = z["x"]
            y = z["y"] if "y" in z.files else None
    except FliqsError:
        raise
    except Exception as e:  # noqa: BLE001 — a corrupt/unsupported file is bad user input
        raise FliqsError(f"--data {path}: cannot read the .npz ({type(e).__name__}: {e}); "
                         "write it with numpy.savez(path, x=..., y=...)") from None
    if x.dtype.kind not in "biuf":
        raise FliqsError(f"--data {path}: x has dtype {x.dtype}; store numeric (float or integer) inputs")
    if y is not None and y.dtype.kind not in "biu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise FliqsError(f"--data {path}: y has dtype {y.dtype}; store integer class labels")
    return x, (None if y is None else y.astype(np.int64)), None, f"npz {path.name}", x.dtype.kind == "f"


def _image_folder(spec: str):
    from PIL import Image
    root = Path(spec)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        items = [(f, label) for label, d in enumerate(subdirs)
                 for f in sorted(d.rglob("*")) if f.suffix.lower() in _IMAGE_EXT]
        classes = [d.name for d in subdirs]
    else:
        items = [(f, None) for f in sorted(root.iterdir()) if f.suffix.lower() in _IMAGE_EXT]
        classes = []
    if not items:
        raise FliqsError(f"--data {root}: no images found (expected {', '.join(sorted(_IMAGE_EXT))} "
                         "files, in class subfolders for labels)")
    arrays = []
    for f, _ in items:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except Exception as e:  # noqa: BLE001
            raise FliqsError(f"--data {f}: not a readable image ({type(e).__name__}); remove or fix it") from None
    # different sizes: resize each to the first one's size here; the model size is applied later
    h, w = arrays[0].shape[:2]
    if any(a.shape[:2] != (h, w) for a in arrays):
        arrays = [np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR)) for a in arrays]
    x = np.stack(arrays)
    y = np.array([lab for _, lab in items], dtype=np.int64) if classes else None
    desc = f"image folder {root.name} ({len(items)} images, {len(classes) or 'no'} classes)"
    return x, y, None, desc, False


def _source_of(spec: str) -> Callable:
    """Pick the source for a spec string (registry first, then file kinds)."""
    key = spec.strip().lower()
    if key in SOURCES:
        return SOURCES[key]
    path = Path(spec)
    if path.suffix.lower() == ".npz":
        if not path.exists():
            raise FliqsError(f"--data {spec}: file not found")
        return _npz
    if path.is_dir():
        return _image_folder
    raise FliqsError(f"--data {spec}: unknown data; use one of {', '.join(SOURCES)}, a .npz file "
                     "with x (and y), or an image folder")


SOURCES: dict = {"digits": _digits, "fashion-mnist": _fashion_mnist, "fashion_mnist": _fashion_mnist}


# ---- preprocessing ----------------------------------------------------------------------------
def _as_nchw(x: np.ndarray, channels: int, name: str) -> np.ndarray:
    """[N,H,W] / [N,H,W,C] (channels last, C in 1/3/4) / [N,C,H,W] → [N,C,H,W]."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        channels_last = x.shape[-1] in (1, 3, 4) and not (x.shape[1] == channels and x.shape[1] in (1, 3))
        if channels_last:
            return np.moveaxis(x[..., :3] if x.shape[-1] == 4 else x, -1, 1)
        return x
    raise FliqsError(f"--data {name}: x has shape {tuple(x.shape)}; the model wants images "
                     "[N,H,W], [N,H,W,C] or [N,C,H,W]")


def _preprocess(x: np.ndarray, target: tuple, name: str, preprocessed: bool,
                mean, std) -> tuple[torch.Tensor, bool]:
    """Returns (tensor [N, *target], normalise?)."""
    integer = x.dtype.kind in "biu"
    t = torch.from_numpy(np.require(x, requirements=["C", "W"])).to(torch.float32)
    if integer:
        t = t / 255.0 if x.max(initial=0) > 1 else t
    if tuple(t.shape[1:]) == tuple(target):
        return t, not (preprocessed and mean is None and std is None)
    if len(target) != 3:  # non-image model: only an exact match or a flattenable one
        if int(np.prod(t.shape[1:])) == int(np.prod(target)):
            return t.reshape(t.shape[0], *target), not preprocessed
        raise FliqsError(f"--data {name}: samples have shape {tuple(t.shape[1:])}, the model input "
                         f"wants {tuple(target)}; reshape the data")
    c, h, w = target
    t = torch.from_numpy(_as_nchw(t.numpy(), c, name))
    if t.shape[1] != c:
        if t.shape[1] == 1:
            t = t.expand(-1, c, -1, -1)
        elif t.shape[1] == 3 and c == 1:
            t = (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise FliqsError(f"--data {name}: images have {t.shape[1]} channels, the model wants {c}")
    if tuple(t.shape[2:]) != (h, w):
        t = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False,
                                            antialias=t.shape[2] > h or t.shape[3] > w)
    return t.contiguous(), True


def _vector(v, c: int, name: str) -> torch.Tensor:
    """mean/std as a broadcastable tensor: a scalar, or one value per channel."""
    t = torch.as_tensor(v if isinstance(v, (list, tuple)) else [v], dtype=torch.float32).flatten()
    if t.numel() == 1:
        return t.reshape(())
    if t.numel() != c:
        raise FliqsError(f"--data {name}: mean/std {list(v)} has {t.numel()} values, the model input "
                         f"has {c} channels; give 1 or {c} values")
    return t.view(1, c, 1, 1)


def load_data(spec: str, input_spec: InputSpec, holdout: float = 0.2, seed: int = 0,
              mean: Union[None, float, Sequence[float]] = None,
              std: Union[None, float, Sequence[float]] = None,
              num_classes: Optional[int] = None, limit: Optional[int] = None) -> Dataset:
    """Load ``spec`` and shape it for a model input.

    Requires: ``input_spec.shape`` = (batch, *sample shape); 0 < holdout < 1.
    Guarantees: float32 ``x_*`` of shape [N, *input_spec.shape[1:]], finite; int64 labels in
    [0, num_classes) (``num_classes`` given: checked against it; else max label + 1); a seeded
    random train/val split (``holdout`` of the samples in val). ``limit`` keeps the first N
    samples (after shuffling) of train and of test, for quick runs.
    Raises ``FliqsError`` (one line) for unknown specs, missing files, empty data, NaN/inf inputs,
    unusable shapes or dtypes, label count mismatches and labels out of range.
    """
    if not 0.0 < holdout < 1.0:
        raise FliqsError(f"holdout={holdout}: use a fraction between 0 and 1, e.g. 0.2")
    target = tuple(int(d) for d in input_spec.shape[1:])
    x, y, test, desc, preprocessed = _source_of(spec)(spec)
    name = spec
    if x.shape[0] == 0 or x.size == 0:
        raise FliqsError(f"--data {name}: no samples; provide at least 2")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise FliqsError(f"--data {name}: x contains NaN or infinite values; clean the data")
    if y is not None:
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise FliqsError(f"--data {name}: y has shape {tuple(y.shape)} but x has {x.shape[0]} "
                             "samples; give one integer label per sample")
        top = num_classes if num_classes is not None else int(y.max()) + 1
        if y.min() < 0 or y.max() >= top:
            raise FliqsError(f"--data {name}: labels must lie in [0, {top - 1}] (found "
                             f"{int(y.min())}..{int(y.max())}); relabel classes as 0..{top - 1}")
        num_classes = top
    if x.shape[0] < 2:
        raise FliqsError(f"--data {name}: only {x.shape[0]} sample; provide at least 2")
    xt, norm = _preprocess(x, target, name, preprocessed, mean, std)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(xt.shape[0], generator=g)
    if limit:
        perm = perm[:max(2, int(limit))]
    n_val = max(1, int(round(holdout * len(perm))))
    tr, va = perm[n_val:], perm[:n_val]
    yt = None if y is None else torch.from_numpy(y)
    test_x = test_y = None
    if test is not None:
        test_x, _ = _preprocess(test[0], target, name, preprocessed, mean, std)
        test_y = torch.from_numpy(test[1])
        if limit:
            test_x, test_y = test_x[:int(limit)], test_y[:int(limit)]
    if norm:
        c = target[0] if len(target) == 3 else 1
        if mean is None:
            mean = IMAGENET_MEAN if c == 3 else float(xt[tr].mean())
        if std is None:
            std = IMAGENET_STD if c == 3 else float(xt[tr].std())
        m, s = _vector(mean, c, name), _vector(std, c, name)
        if torch.any(s <= 0):
            raise FliqsError(f"--data {name}: std must be positive, got {std}")
        xt = (xt - m) / s
        if test_x is not None:
            test_x = (test_x - m) / s
        desc += f", normalised (mean={np.round(np.asarray(mean), 4).tolist()}, std={np.round(np.asarray(std), 4).tolist()})"
    return Dataset(x_train=xt[tr].contiguous(), y_train=None if yt is None else yt[tr],
                   x_val=xt[va].contiguous(), y_val=None if yt is None else yt[va],
                   num_classes=num_classes, description=desc, x_test=test_x, y_test=test_y)
