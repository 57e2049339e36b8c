"""Search throughput: FLIQS steps/s vs single-format QAT of the same model, on 1 and 2
data-parallel processes, in one run.

Every method runs the same searchable ResNet-8 (Fashion-MNIST shape, BN folded, formats int2 /
int4 / int8 / fp8_e4m3) at the same global batch; a method on N processes is this script under
``torch.distributed.run --standalone --nproc-per-node N`` (gloo), each rank taking its share of
the batch (``fliqs_compiler.search.parallel``). Timed: ``--steps`` steps after ``--warmup``
untimed ones, wall time of the slowest rank. Methods alternate over ``--repeats`` rounds so the
machine's load hits all alike; the printed ratios are within this run.

Goals (issue "search at scale", benchmarks, not tests): FLIQS ≤ 1.10× the QAT step time on one
process; 2 processes ≥ 1.6× the throughput of one on a machine with the cores for it (each rank
gets cores / N threads here, so on a 2-core machine two ranks share the same two cores).

    python bench/search_throughput.py [--steps 20] [--batch 128] [--repeats 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: examples/

FORMATS = ["int2", "int4", "int8", "fp8_e4m3"]
METHODS = [("qat:int4", 1), ("fliqs", 1), ("qat:int4", 2), ("fliqs", 2)]


def worker(method: str, steps: int, warmup: int, batch: int) -> None:
    import torch
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(2, cores) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    from examples.toy_models import ResNet8, fuse_bn, make_searchable
    from fliqs_compiler.data.sources import load_data
    from fliqs_compiler.ir.graph import InputSpec
    from fliqs_compiler.search import OneShotSearch, SearchOptions, TrainOptions, parallel
    from fliqs_compiler.search.trainer import WeightTrainer

    torch.manual_seed(0)
    data = load_data("fashion-mnist", InputSpec("x", (1, 1, 28, 28)), limit=4096)
    graph = make_searchable(fuse_bn(ResNet8()), data.x_train[:1], FORMATS, name="resnet8")
    with torch.no_grad():  # every candidate's scales initialised before anything is timed
        for fmt in FORMATS:
            graph.space.apply(graph.gm, graph.space.uniform_choice(fmt))
            graph.gm(data.x_train[:batch])
    opts = SearchOptions(steps=10 ** 6, train=TrainOptions(batch_size=batch))
    with parallel.start("cpu") as par:
        gen = torch.Generator().manual_seed(0)
        if method == "fliqs":
            search = OneShotSearch(graph, data, "bops=0.3x", opts)
            step = lambda i: search.step(search.controller.warmup_steps + i)  # noqa: E731
        else:
            trainer = WeightTrainer(graph.gm, data, opts.train)
            graph.space.apply(graph.gm, graph.space.uniform_choice(method.split(":")[1]))
            step = lambda i: trainer.step(gen)  # noqa: E731
        for i in range(warmup):
            step(i)
        t0 = time.perf_counter()
        for i in range(steps):
            step(warmup + i)
        seconds = time.perf_counter() - t0
        if par.world > 1:
            import torch.distributed as dist
            t = torch.tensor([seconds])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's time
            seconds = float(t)
        if par.writer:
            print(json.dumps({"method": method, "processes": par.world, "seconds": seconds,
                              "steps": steps, "batch": batch, "threads": torch.get_num_threads(),
                              "ms_per_step": 1e3 * seconds / steps,
                              "images_per_s": steps * batch / seconds}))


def _run(method: str, nproc: int, a) -> dict:
    script = [__file__, "--worker", method, "--steps", str(a.steps), "--warmup", str(a.warmup),
              "--batch", str(a.batch)]
    cmd = ([sys.executable, *script] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *script])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, min(2, os.cpu_count() or 1) // nproc))}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{method} on {nproc} process(es) failed:\n{p.stderr[-2000:]}")
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.steps, a.warmup, a.batch)
        return
    runs = {f"{m}@{n}": [] for m, n in METHODS}
    for _ in range(a.repeats):
        for m, n in METHODS:
            runs[f"{m}@{n}"].append(_run(m, n, a))
    res = {k: {"ms_per_step": statistics.median(r["ms_per_step"] for r in rs),
               "images_per_s": statistics.median(r["images_per_s"] for r in rs),
               "threads_per_process": rs[0]["threads"]} for k, rs in runs.items()}
    ratios = {"fliqs_vs_qat_step_time@1": res["fliqs@1"]["ms_per_step"] / res["qat:int4@1"]["ms_per_step"],
              "fliqs_vs_qat_step_time@2": res["fliqs@2"]["ms_per_step"] / res["qat:int4@2"]["ms_per_step"],
              "fliqs_throughput_2_vs_1": res["fliqs@2"]["images_per_s"] / res["fliqs@1"]["images_per_s"],
              "qat_throughput_2_vs_1": res["qat:int4@2"]["images_per_s"] / res["qat:int4@1"]["images_per_s"]}
    print(f"ResNet-8 (BN folded), Fashion-MNIST 28x28, global batch {a.batch}, {a.steps} timed steps "
          f"x {a.repeats} rounds, {os.cpu_count()} cores (threads per process: cores / processes)")
    print(f"{'method@processes':18s} {'ms/step':>9s} {'images/s':>9s} {'threads':>8s}")
    for k, r in res.items():
        print(f"{k:18s} {r['ms_per_step']:9.1f} {r['images_per_s']:9.0f} {r['threads_per_process']:8d}")
    for k, v in ratios.items():
        print(f"{k:28s} {v:6.2f}")
    out = {"config": {"batch": a.batch, "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
                      "cores": os.cpu_count(), "formats": FORMATS, "backend": "gloo",
                      "model": "ResNet-8 (BN folded), 1x28x28"},
           "results": res, "ratios": ratios, "runs": runs}
    if a.json:
        from fliqs_compiler.base import atomic
        atomic.write_text(Path(a.json), json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
