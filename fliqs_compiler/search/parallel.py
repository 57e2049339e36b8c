"""Where the search runs: the torch device, and data parallelism over ``torch.distributed``.

``torchrun --nproc-per-node N -m fliqs_compiler.cli compile …`` (or ``fliqs compile --nproc N``,
which launches the same through ``torch.distributed.run``) starts N ranks. ``start(device)``
joins them into one process group (gloo on CPU, nccl on CUDA) and returns a ``DataParallel``;
a plain process gets ``Replicas`` (one rank, every method the identity). The trainer only ever
talks to this object, so the search code has one path for one process and for many:

- every rank draws the same *global* batch from the same seeded generator and keeps its
  contiguous share (``shard``) — sampled configurations, batches and the controller are the same
  on every rank without a broadcast, because every rank consumes the generator identically;
- weights train under ``torch.nn.parallel.DistributedDataParallel`` (gradients all-reduced; the
  mean of equal shards' mean losses is the global batch's mean loss);
- forward-only passes (reward, prior, evaluation, teacher outputs) run on the shard and
  ``gather`` the outputs back in global order, so every metric is computed on exactly the batch
  one process would see, and every rank computes the same reward;
- an activation quantizer that initialises its scale during a sharded forward sees the whole
  global batch (``quantizers.init_rows_from``), as one process would.
Only rank 0 (``writer``) writes files. What stays different from one process: float summation
order of the all-reduced gradients (last-bit differences in the weights), so runs agree in the
chosen configuration and in accuracy to a tolerance, not bit for bit.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Optional

import torch

from fliqs_compiler.base.errors import FliqsError

__all__ = ["Replicas", "DataParallel", "resolve_device", "start", "current", "world_from_env",
           "check_split", "map_outputs"]

# How long a rank waits in a collective for the others (a peer that died is noticed by gloo's
# closed connection at once; this bounds a peer that hangs). Long by default: the other ranks
# wait in one broadcast while rank 0 measures a latency table, which can take an hour when tuned.
TIMEOUT_ENV = "FLIQS_DDP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3 * 3600


def resolve_device(text: Optional[str]) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` → a device;
    anything else, or CUDA on a machine without it → FliqsError naming ``--device``."""
    t = (text or "auto").strip().lower()
    if t == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(t)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise FliqsError(f"--device {text!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FliqsError(f"--device {text}: this machine has no CUDA device torch can use "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FliqsError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) "
                             f"here (cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    return dev


def check_split(batch_size: int, world: int) -> None:
    """The global batch must split into equal shares (then the mean of the shares' mean losses
    is the batch's mean loss, as on one process)."""
    if world > 1 and batch_size % world:
        raise FliqsError(f"batch size {batch_size} does not split over {world} processes; use a "
                         "process count that divides it (e.g. 2 or 4)")


def world_from_env() -> int:
    """The world size torchrun announced (``WORLD_SIZE``), 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _split(n: int, world: int) -> list:
    """Row bounds of each rank's contiguous share of ``n`` rows (sizes differ by at most one)."""
    return [(r * n // world, (r + 1) * n // world) for r in range(world)]


def map_outputs(fn, out):
    """``fn`` on a tensor, or on each tensor of a tuple/list of outputs (None stays None)."""
    if out is None:
        return None
    if isinstance(out, (tuple, list)):
        return type(out)(map_outputs(fn, o) for o in out)
    return fn(out) if torch.is_tensor(out) else out


class Replicas:
    """One process: the identity for every data-parallel operation."""

    world, rank, backend = 1, 0, None
    writer = True

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device("cpu") if device is None else torch.device(device)

    def shard(self, out):
        return out

    def gather(self, out, total: Optional[int] = None):
        return out

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def wrap(self, gm: torch.nn.Module) -> torch.nn.Module:
        return gm

    def forward(self, model, x):
        """``model`` on the whole batch ``x`` (every rank's share, outputs in global order)."""
        return model(x)

    def sharded(self):
        """The body runs this rank's share of a batch (see ``DataParallel.sharded``)."""
        return contextlib.nullcontext()

    def from_writer(self, make):
        """``make()`` run once (rank 0) and its result on every rank."""
        return make()

    def describe(self) -> dict:
        return {"world_size": 1, "backend": None, "device": str(self.device)}


class DataParallel(Replicas):
    """This rank of a ``torch.distributed`` process group (see the module docstring)."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist
        super().__init__(device)
        self.dist = dist
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.backend = dist.get_backend()
        self.writer = self.rank == 0

    def shard(self, out):
        """This rank's contiguous rows of a global batch (tensor or tuple of tensors)."""
        def rows(t):
            lo, hi = _split(len(t), self.world)[self.rank]
            return t[lo:hi]
        return map_outputs(rows, out)

    def gather(self, out, total: Optional[int] = None):
        """Every rank's share of a batch, concatenated in rank order (= the global batch order).
        ``total``: the global row count (the shares may differ by one row: padded, then cut)."""
        def cat(t):
            n = total if total is not None else len(t) * self.world
            bounds = _split(n, self.world)
            width = max(hi - lo for lo, hi in bounds)
            padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
            padded[:len(t)] = t
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            self.dist.all_gather(parts, padded.contiguous())
            return torch.cat([p[:hi - lo] for p, (lo, hi) in zip(parts, bounds)])
        return map_outputs(cat, out)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated along dim 0, whatever each rank's row count (an
        activation inside the model need not have the batch's rows: e.g. [B·T, C])."""
        n = torch.tensor([len(t)], device=t.device)
        counts = [torch.zeros_like(n) for _ in range(self.world)]
        self.dist.all_gather(counts, n)
        counts = [int(c) for c in counts]
        padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[:len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self.dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        v = value.detach().clone()
        self.dist.all_reduce(v)
        return v / self.world

    def wrap(self, gm: torch.nn.Module) -> torch.nn.Module:
        """``gm`` under DDP. Each step trains one sampled configuration: the other formats'
        scales get no gradient (``find_unused_parameters``); buffers are equal on every rank by
        construction (same data, same order), so they are synced once, not every forward."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(gm, device_ids=ids, find_unused_parameters=True, forward_sync_buffers=False)

    def sharded(self):
        """Activation scales first initialised in the body see every rank's rows."""
        from fliqs_compiler.numerics.quantizers import init_rows_from
        return init_rows_from(self.gather_rows)

    def forward(self, model, x):
        with self.sharded():
            return self.gather(model(self.shard(x)), total=len(x))

    def from_writer(self, make):
        box = [make() if self.writer else None]
        self.dist.broadcast_object_list(box, src=0)  # pickled between our own ranks only
        return box[0]

    def describe(self) -> dict:
        return {"world_size": self.world, "backend": self.backend, "device": str(self.device)}


_CURRENT: Optional[Replicas] = None


def current() -> Replicas:
    """The data-parallel context of this process (``start``'s), else one CPU process."""
    return _CURRENT if _CURRENT is not None else Replicas()


@contextlib.contextmanager
def start(device: Optional[str] = None):
    """Join the torchrun job this process belongs to (if any) on ``device`` and make it
    ``current()`` for the body; the process group is torn down afterwards.

    Under torchrun each rank takes ``cuda:LOCAL_RANK`` when the device is CUDA (one GPU per
    rank, the torchrun convention) and the backend is nccl; on CPU it is gloo."""
    global _CURRENT
    dev = resolve_device(device)
    world = world_from_env()
    if world == 1:
        previous, _CURRENT = _CURRENT, Replicas(dev)
        try:
            yield _CURRENT
        finally:
            _CURRENT = previous
        return
    import torch.distributed as dist
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    try:
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        raise FliqsError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: give seconds, e.g. 3600") from None
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    previous, _CURRENT = _CURRENT, DataParallel(dev)
    try:
        yield _CURRENT
    finally:
        _CURRENT = previous
        if owned:
            dist.destroy_process_group()
