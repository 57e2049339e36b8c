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
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import InputSpec

__all__ = ["Dataset", "load_data", "SOURCES", "FASHION_MNIST_DIR", "StreamedImages", "STREAM_ABOVE_BYTES"]

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

    def use_device(self, device: torch.device) -> None:
        """Tell streamed splits (``StreamedImages``) where batches go; tensors need nothing."""
        for x in (self.x_train, self.x_val, self.x_test):
            if isinstance(x, StreamedImages):
                x.use_device(device)

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


def _image_files(root: Path) -> tuple[list, list]:
    """(items [(file, label or None)] in a fixed order, class names) of an image folder."""
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
    return items, classes


def _decode(f: Path) -> np.ndarray:
    """One image file as RGB uint8 [H, W, 3]; an unreadable file is a one-line FliqsError."""
    from PIL import Image
    try:
        with Image.open(f) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001
        raise FliqsError(f"--data {f}: not a readable image ({type(e).__name__}); remove or fix it") from None


def _fit(a: np.ndarray, size: tuple) -> np.ndarray:
    """``a`` resized (PIL bilinear) to ``size`` = (H, W) when it differs: a folder's images all
    take the first image's size; the model's size is applied later."""
    from PIL import Image
    if a.shape[:2] == tuple(size):
        return a
    return np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.BILINEAR))


def _image_folder(spec: str):
    root = Path(spec)
    items, classes = _image_files(root)
    arrays = [_decode(f) for f, _ in items]
    x = np.stack([_fit(a, arrays[0].shape[:2]) for a in arrays])
    y = np.array([lab for _, lab in items], dtype=np.int64) if classes else None
    return x, y, None, _folder_description(root, items, classes), False


def _folder_description(root: Path, items: list, classes: list) -> str:
    return f"image folder {root.name} ({len(items)} images, {len(classes) or 'no'} classes)"


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
                mean, std, eight_bit: Optional[bool] = None) -> tuple[torch.Tensor, bool]:
    """Returns (tensor [N, *target], normalise?). Integer data is scaled to [0, 1] when it is
    8-bit (``eight_bit``; None: when its maximum exceeds 1)."""
    integer = x.dtype.kind in "biu"
    t = torch.from_numpy(np.require(x, requirements=["C", "W"])).to(torch.float32)
    if integer:
        t = t / 255.0 if (x.max(initial=0) > 1 if eight_bit is None else eight_bit) else t
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


# ---- streamed image folders -------------------------------------------------------------------
# An image folder whose decoded float32 samples would take more than this is decoded per batch
# instead of held in memory (loading in memory peaks at ~3x it: the uint8 stack, the float
# tensor, the normalised copy). Every other source is small enough to hold.
STREAM_ABOVE_BYTES = 1 << 30
STREAM_WORKERS = 2  # decoding worker processes of a streamed folder (0: in this process)


class _FolderSamples(torch.utils.data.Dataset):
    """Sample ``i`` of an image folder decoded and preprocessed exactly as ``load_data`` does in
    memory (``_fit`` to the first image's size, ``_preprocess``, normalisation). A file that
    cannot be read comes back as its one-line error text (an exception raised in a worker would
    reach the caller wrapped in the worker's traceback)."""

    def __init__(self, files: list, size: tuple, target: tuple, name: str, norm=None):
        self.files, self.size, self.target, self.name, self.norm = files, size, target, name, norm

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            a = _fit(_decode(self.files[i]), self.size)
        except FliqsError as e:
            return str(e)
        t, _ = _preprocess(a[None], self.target, self.name, False, None, None, eight_bit=True)
        if self.norm is not None:
            t = (t - self.norm[0]) / self.norm[1]
        return t[0]


def _stack_or_error(samples: list):
    """A DataLoader batch: the stacked samples, or the first error text among them."""
    return next((e for e in samples if isinstance(e, str)), None) or torch.stack(samples)


class _Requested(torch.utils.data.Sampler):
    """The batch sampler of a streamed folder's loader: the rows asked for now, cut into one
    contiguous chunk per worker (the loader returns the chunks in order)."""

    def __init__(self, workers: int):
        self.rows: list = []
        self.workers = max(1, workers)

    def __iter__(self):
        n = len(self.rows)
        bounds = [(w * n // self.workers, (w + 1) * n // self.workers) for w in range(self.workers)]
        return iter([self.rows[lo:hi] for lo, hi in bounds if hi > lo])

    def __len__(self):
        return min(len(self.rows), self.workers)


class _Decoder:
    """The decoding of one streamed folder, shared by its splits: in this process, or by a
    persistent ``DataLoader`` with ``workers`` processes (pinned batches when the trainer's
    device is CUDA: ``StreamedImages.use_device``)."""

    def __init__(self, samples: _FolderSamples, workers: int):
        self.samples, self.workers, self.pin = samples, int(workers), False
        self._loader = None

    def use_device(self, device: torch.device) -> None:
        pin = torch.device(device).type == "cuda"
        if pin != self.pin:
            self.pin, self._loader = pin, None

    def rows(self, rows: list) -> torch.Tensor:
        if self.workers <= 0 or len(rows) < 2:
            parts = [_stack_or_error([self.samples[i] for i in rows])] if rows else []
        else:
            if self._loader is None:
                self._sampler = _Requested(self.workers)
                self._loader = torch.utils.data.DataLoader(
                    self.samples, batch_sampler=self._sampler, num_workers=self.workers,
                    collate_fn=_stack_or_error, pin_memory=self.pin, persistent_workers=True)
            self._sampler.rows = rows
            parts = list(self._loader)
        error = next((p for p in parts if isinstance(p, str)), None)
        if error is not None:
            raise FliqsError(error)
        if not parts:
            return torch.empty((0, *self.samples.target), dtype=torch.float32)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class StreamedImages:
    """One split of a streamed image folder, indexed like the tensor ``load_data`` would hold:
    ``x[idx]`` (index tensor or list), ``x[a:b]``, ``x[i]`` decode those samples now and return
    float32 [n, *sample shape] (``len``, ``shape`` and ``dtype`` as the tensor's)."""

    dtype = torch.float32

    def __init__(self, decoder: _Decoder, rows: torch.Tensor):
        self.decoder, self.rows = decoder, rows

    def __len__(self):
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.decoder.samples.target))

    def __getitem__(self, key):
        if isinstance(key, int):
            return self.decoder.rows([int(self.rows[key])])[0]
        return self.decoder.rows(self.rows[key].reshape(-1).tolist())

    def use_device(self, device: torch.device) -> None:
        """Batches for ``device``: pinned (fast, asynchronous copies) when it is a CUDA device."""
        self.decoder.use_device(device)


def _streamed_folder(root: Path, items: list, classes: list, target: tuple, holdout: float,
                     seed: int, mean, std, num_classes: Optional[int], limit: Optional[int],
                     workers: int) -> Dataset:
    """``load_data``'s Dataset of an image folder, its splits ``StreamedImages``: the same rows,
    values and labels as in memory, 8-bit images always scaled by 1/255 (in memory: when some
    pixel exceeds 1). Without ``mean``/``std`` a 1-channel model's statistics come from one
    streamed pass over the training split (float64 sums: equal to the in-memory ones to float32
    rounding)."""
    name = str(root)
    if len(target) != 3:
        raise FliqsError(f"--data {name}: an image folder feeds image models [N, C, H, W]; the "
                         f"model input wants {target}")
    y = np.array([lab for _, lab in items], dtype=np.int64) if classes else None
    y, num_classes = _checked_labels(y, len(items), num_classes, name)
    if len(items) < 2:
        raise FliqsError(f"--data {name}: only {len(items)} sample; provide at least 2")
    size = _decode(items[0][0]).shape[:2]
    samples = _FolderSamples([f for f, _ in items], size, target, name)
    tr, va = _split_rows(len(items), holdout, seed, limit)
    decoder = _Decoder(samples, workers)

    def train_stats():
        # its own decoder: workers fork with the samples as they are, before the normalisation
        split, n, total, squares = StreamedImages(_Decoder(samples, workers), tr), 0, 0.0, 0.0
        for i in range(0, len(split), 256):
            t = split[i:i + 256].to(torch.float64)
            n, total, squares = n + t.numel(), total + float(t.sum()), squares + float((t * t).sum())
        var = (squares - total * total / n) / max(1, n - 1)
        return total / n, math.sqrt(max(var, 0.0))
    mean, std, m, s = _normalisation(target[0], mean, std, train_stats, name)
    samples.norm = (m, s)
    yt = None if y is None else torch.from_numpy(y)
    desc = (_folder_description(root, items, classes)
            + f", streamed ({workers} decoding workers)" + _normalised_note(mean, std))
    return Dataset(x_train=StreamedImages(decoder, tr), y_train=None if yt is None else yt[tr],
                   x_val=StreamedImages(decoder, va), y_val=None if yt is None else yt[va],
                   num_classes=num_classes, description=desc)


def _checked_labels(y: Optional[np.ndarray], n: int, num_classes: Optional[int], name: str):
    """(labels, class count): one int64 label per sample, in [0, num_classes)."""
    if y is None:
        return None, num_classes
    if y.ndim != 1 or y.shape[0] != n:
        raise FliqsError(f"--data {name}: y has shape {tuple(y.shape)} but x has {n} "
                         "samples; give one integer label per sample")
    top = num_classes if num_classes is not None else int(y.max()) + 1
    if y.min() < 0 or y.max() >= top:
        raise FliqsError(f"--data {name}: labels must lie in [0, {top - 1}] (found "
                         f"{int(y.min())}..{int(y.max())}); relabel classes as 0..{top - 1}")
    return y, top


def _split_rows(n: int, holdout: float, seed: int, limit: Optional[int]) -> tuple:
    """(train rows, validation rows): a seeded permutation, ``holdout`` of it in validation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if limit:
        perm = perm[:max(2, int(limit))]
    n_val = max(1, int(round(holdout * len(perm))))
    return perm[n_val:], perm[:n_val]


def _normalisation(c: int, mean, std, train_stats: Callable, name: str) -> tuple:
    """(mean, std as given or defaulted, broadcastable mean, std): ImageNet statistics for 3
    channels, those of the training split (``train_stats() -> (mean, std)``) for 1."""
    if c != 3 and (mean is None or std is None):
        m, s = train_stats()
        mean, std = (m if mean is None else mean), (s if std is None else std)
    mean, std = (IMAGENET_MEAN if mean is None else mean), (IMAGENET_STD if std is None else std)
    m, s = _vector(mean, c, name), _vector(std, c, name)
    if torch.any(s <= 0):
        raise FliqsError(f"--data {name}: std must be positive, got {std}")
    return mean, std, m, s


def _normalised_note(mean, std) -> str:
    return f", normalised (mean={np.round(np.asarray(mean), 4).tolist()}, std={np.round(np.asarray(std), 4).tolist()})"


def load_data(spec: str, input_spec: InputSpec, holdout: float = 0.2, seed: int = 0,
              mean: Union[None, float, Sequence[float]] = None,
              std: Union[None, float, Sequence[float]] = None,
              num_classes: Optional[int] = None, limit: Optional[int] = None,
              stream: Optional[bool] = None, workers: int = STREAM_WORKERS) -> Dataset:
    """Load ``spec`` and shape it for a model input.

    Requires: ``input_spec.shape`` = (batch, *sample shape); 0 < holdout < 1.
    Guarantees: float32 ``x_*`` of shape [N, *input_spec.shape[1:]], finite; int64 labels in
    [0, num_classes) (``num_classes`` given: checked against it; else max label + 1); a seeded
    random train/val split (``holdout`` of the samples in val). ``limit`` keeps the first N
    samples (after shuffling) of train and of test, for quick runs.
    An image folder is streamed (``StreamedImages``: decoded per batch by ``workers`` worker
    processes, the same values as loaded in memory) when ``stream`` is True, or when it is None
    and the decoded samples would take more than ``STREAM_ABOVE_BYTES``; every other source is
    held in memory.
    Raises ``FliqsError`` (one line) for unknown specs, missing files, empty data, NaN/inf inputs,
    unusable shapes or dtypes, label count mismatches and labels out of range.
    """
    if not 0.0 < holdout < 1.0:
        raise FliqsError(f"holdout={holdout}: use a fraction between 0 and 1, e.g. 0.2")
    target = tuple(int(d) for d in input_spec.shape[1:])
    source = _source_of(spec)
    if source is _image_folder and stream is not False:
        items, classes = _image_files(Path(spec))
        if stream or len(items) * 4 * int(np.prod(target)) > STREAM_ABOVE_BYTES:
            return _streamed_folder(Path(spec), items, classes, target, holdout, seed, mean, std,
                                    num_classes, limit, workers)
    x, y, test, desc, preprocessed = source(spec)
    name = spec
    if x.shape[0] == 0 or x.size == 0:
        raise FliqsError(f"--data {name}: no samples; provide at least 2")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise FliqsError(f"--data {name}: x contains NaN or infinite values; clean the data")
    y, num_classes = _checked_labels(y, x.shape[0], num_classes, name)
    if x.shape[0] < 2:
        raise FliqsError(f"--data {name}: only {x.shape[0]} sample; provide at least 2")
    xt, norm = _preprocess(x, target, name, preprocessed, mean, std)
    tr, va = _split_rows(xt.shape[0], holdout, seed, limit)
    yt = None if y is None else torch.from_numpy(y)
    test_x = test_y = None
    if test is not None:
        test_x, _ = _preprocess(test[0], target, name, preprocessed, mean, std)
        test_y = torch.from_numpy(test[1])
        if limit:
            test_x, test_y = test_x[:int(limit)], test_y[:int(limit)]
    if norm:
        c = target[0] if len(target) == 3 else 1
        mean, std, m, s = _normalisation(c, mean, std, lambda: (float(xt[tr].mean()), float(xt[tr].std())), name)
        xt = (xt - m) / s
        if test_x is not None:
            test_x = (test_x - m) / s
        desc += _normalised_note(mean, std)
    return Dataset(x_train=xt[tr].contiguous(), y_train=None if yt is None else yt[tr],
                   x_val=xt[va].contiguous(), y_val=None if yt is None else yt[va],
                   num_classes=num_classes, description=desc, x_test=test_x, y_test=test_y)
