"""``--device`` and ``--nproc``: where the search trains, and ``fliqs compile --nproc N`` as the
same command under ``torchrun`` (``torch.distributed.run``, standalone: one machine, loopback
rendezvous on a free port)."""
from __future__ import annotations

import logging
import os
import signal
import sys

import click

from fliqs_compiler.base.errors import FliqsError


class RankFailed(FliqsError):
    """A data-parallel rank ended the job (exit code 1: not the user's input)."""

    exit_code = 1

device_option = click.option(
    "--device", metavar="DEVICE", default="auto", show_default=True,
    help="Where the search trains: auto (CUDA when available), cpu, cuda, cuda:N. Export, "
         "lowering and measurement run on the host.")

nproc_option = click.option(
    "--nproc", metavar="N", default="1", show_default=True,
    help="Data-parallel search processes on this machine (launched through torchrun; gloo on "
         "CPU, nccl with one GPU each). Same as: torchrun --nproc-per-node N -m fliqs_compiler.cli …")


def check_nproc(value, search_options: dict) -> int:
    """``--nproc``: a positive count that splits the search's global batch."""
    from fliqs_compiler.search.oneshot import recipe_train
    from fliqs_compiler.search.parallel import check_split
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise FliqsError(f"--nproc {value!r}: give a number of processes ≥ 1")
    check_split((search_options.get("train") or recipe_train()).batch_size, n)
    return n


def _without_nproc(argv: list) -> list:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _signal_name(code: int) -> str:
    try:
        return f" ({signal.Signals(-code).name})" if code < 0 else ""
    except ValueError:
        return ""


LAUNCHED_ENV = "FLIQS_LAUNCHED_BY"  # set for the ranks ``launch`` starts


def _peer_lost(error: BaseException) -> bool:
    """A collective failed because another rank is gone (gloo's closed/reset connection, NCCL's
    watchdog) — not this rank's own fault."""
    import torch.distributed as dist
    text = str(error)
    return isinstance(error, getattr(dist, "DistError", ())) or any(
        w in text for w in ("gloo/transport", "Connection reset by peer", "Connection closed by peer",
                            "NCCL communicator was aborted"))


# The exit code of a rank that stopped because another one is gone (EX_TEMPFAIL): the launcher
# then names the rank that really failed, even when both failures reach it in the same second.
PEER_LOST_EXIT = 75


def silenced(error: BaseException) -> bool:
    """Whether this rank of a ``launch``-ed job leaves the error line to others: rank 0 prints
    the user's errors (every rank raises the same one), the launcher names a rank that died."""
    if not os.environ.get(LAUNCHED_ENV):
        return False
    if _peer_lost(error):
        return True
    return isinstance(error, FliqsError) and os.environ.get("RANK", "0") != "0"


def leave_silently(error: BaseException, code: int) -> None:
    """End a silenced rank (see ``silenced``) at once, without a word (``exit_now``)."""
    if silenced(error):
        exit_now(code if not _peer_lost(error) else PEER_LOST_EXIT, always=True)


def exit_now(code: int, always: bool = False) -> None:
    """End this process with ``code`` at once if it is a rank of a multi-process job (or
    ``always``), its output flushed. ``os._exit`` skips the interpreter's teardown, where gloo's
    still running C++ threads are destroyed and the C++ runtime aborts with "terminate called
    without an active exception" — after the rank's work is done, even after
    ``destroy_process_group`` (measured: 1 of 32 two-rank searches, rank 1, SIGABRT with no
    Python frame; torchrun then fails the whole job). Every file the job writes is already
    closed (written atomically), so nothing is lost."""
    from fliqs_compiler.search.parallel import world_from_env
    if not always and world_from_env() <= 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _first_failure(failures: dict):
    """(rank, failure) of the rank that ended the job: not one that stopped because a peer was
    gone or that the agent then stopped (SIGTERM); the earliest. Timestamps have one-second
    resolution, so the cause and its consequence often tie."""
    consequence = (PEER_LOST_EXIT, -signal.SIGTERM)
    return min(failures.items(), key=lambda kv: (kv[1].exitcode in consequence,
                                                 kv[1].timestamp, kv[0]))


def launch(nproc: int, out_hint: str) -> None:
    """Run this very command line again as ``nproc`` torchrun ranks and wait for them; a rank
    that fails ends the job (torchrun stops the others) with one line naming it. Returns only
    when every rank succeeded."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    args = torchrun.get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "-m", "fliqs_compiler.cli",
         *_without_nproc(sys.argv[1:])])
    # torchrun's own notes (its OMP_NUM_THREADS warning, the failure table) would bury the line
    # below; our ranks set their threads from the cores (driver.api._start)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHED_ENV] = str(os.getpid())
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        rank, failure = _first_failure(e.failures)
        if failure.exitcode == FliqsError.exit_code:  # the user's error: rank 0 printed it
            sys.exit(failure.exitcode)
        raise RankFailed(
            f"--nproc {nproc}: rank {rank} (pid {failure.pid}) ended with exit code "
            f"{failure.exitcode}{_signal_name(failure.exitcode)}; the job stopped. The last "
            f"checkpoint in {out_hint}/checkpoint/ continues it with --resume") from None
