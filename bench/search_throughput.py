"""Search throughput: FLIQS steps/s vs single-format QAT of the same model, on 1 and 2
data-parallel processes, in one run.

Every method runs the same searchable ResNet-8 (Fashion-MNIST shape, BN folded, formats int2 /
int4 / int8 / fp8_e4m3) at the same global batch; a method on N processes is this script under
``torch.distributed.run --standalone --nproc-per-node N`` (gloo), each rank taking its share of
the batch (``fliqs_compiler.search.parallel``). Timed: ``--steps`` steps after ``--warmup``
untimed ones, wall time of the slowest rank, and its CPU time (this process's threads only, so
less hit by other jobs on a shared machine; OpenMP threads that spin while waiting count too).
Methods alternate over ``--repeats`` rounds so the machine's load hits all alike; the printed
ratios are within this run. ``--before DIR`` (a checkout of an earlier commit, e.g. from
``git worktree add DIR COMMIT``) runs the same methods with DIR's code in the same rounds:
before/after ratios measured under the same load.

``fliqs-run`` times a whole run of the recipe's schedule (search, then the final stretch, which
measures the held-out reward only every ``monitor_every`` steps) per step; ``fliqs-run:1`` the
same schedule measuring it at every step (as before that option). ``fliqs:train-reward`` is the
search step with the reward judged on the step's own batch (``reward_batch="train"``): a
search step is a QAT step plus one forward-only pass over the held-out batch (the recipe's
reward, profiled at 0.24× of the training step's time at 1 thread) plus the controller's
bookkeeping, and this row isolates the bookkeeping.

Goals (issue "search at scale", benchmarks, not tests): FLIQS ≤ 1.10× the QAT step time on one
process; 2 processes ≥ 1.6× the throughput of one on a machine with the cores for it (each rank
gets cores / N threads here, so on a 2-core machine two ranks share the same two cores).

    python bench/search_throughput.py [--steps 20] [--batch 128] [--repeats 2] [--json out.json]
                                      [--before DIR] [--processes 1,2]
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
# A whole recipe schedule (60 % search, 40 % final stretch) averaged per step: what a run costs.
# ``fliqs-run:1`` measures the held-out reward at every step (``monitor_every=1``, the behaviour
# before the final stretch stopped paying for it); both only on one process, this checkout only.
# ``fliqs:train-reward`` is the search step judging the configuration on the step's own batch
# (``reward_batch="train"``, the method's other option): no held-out forward, so what remains
# over QAT is the search's own bookkeeping (sampling, the cost, the controller step).
RUN_METHODS = [("fliqs-run", 1), ("fliqs-run:1", 1), ("fliqs:train-reward", 1)]


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
        if method in ("fliqs", "fliqs:train-reward"):
            reward_batch = "train" if method.endswith("train-reward") else "heldout"
            search = OneShotSearch(graph, data, "bops=0.3x",
                                   SearchOptions(steps=opts.steps, train=opts.train, reward_batch=reward_batch,
                                                 weights_follow="sample" if reward_batch == "train" else "policy"))
            step = lambda i: search.step(search.controller.warmup_steps + i)  # noqa: E731
        elif method.startswith("fliqs-run"):  # the recipe's schedule, exactly warmup + steps long
            every = int(method.split(":")[1]) if ":" in method else SearchOptions().monitor_every
            search = OneShotSearch(graph, data, "bops=0.3x", SearchOptions(
                steps=warmup + steps, prior="none", monitor_every=every, train=opts.train))
            step = search.step
        else:
            trainer = WeightTrainer(graph.gm, data, opts.train)
            graph.space.apply(graph.gm, graph.space.uniform_choice(method.split(":")[1]))
            step = lambda i: trainer.step(gen)  # noqa: E731
        for i in range(warmup):
            step(i)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(steps):
            step(warmup + i)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if par.world > 1:
            import torch.distributed as dist
            t = torch.tensor([seconds, cpu])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's times
            seconds, cpu = (float(v) for v in t)
        if par.writer:
            print(json.dumps({"method": method, "processes": par.world, "seconds": seconds,
                              "steps": steps, "batch": batch, "threads": torch.get_num_threads(),
                              "ms_per_step": 1e3 * seconds / steps, "cpu_ms_per_step": 1e3 * cpu / steps,
                              "images_per_s": steps * batch / seconds, "load_avg_1m": os.getloadavg()[0]}))


def _run(method: str, nproc: int, a, script: str = __file__) -> dict:
    script = [script, "--worker", method, "--steps", str(a.steps), "--warmup", str(a.warmup),
              "--batch", str(a.batch)]
    cmd = ([sys.executable, *script] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *script])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, min(2, os.cpu_count() or 1) // nproc))}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{method} on {nproc} process(es) failed:\n{p.stderr[-2000:]}")
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])


def _summary(runs: dict) -> dict:
    """Medians over the rounds of each method (older checkouts report no CPU time: None)."""
    def median(rs, key):
        vals = [r[key] for r in rs if key in r]
        return statistics.median(vals) if vals else None
    return {k: {"ms_per_step": median(rs, "ms_per_step"), "cpu_ms_per_step": median(rs, "cpu_ms_per_step"),
                "images_per_s": median(rs, "images_per_s"), "threads_per_process": rs[0]["threads"],
                "load_avg_1m": median(rs, "load_avg_1m")} for k, rs in runs.items()}


def _ratios(res: dict, prefix: str, processes: list) -> dict:
    def ratio(a, b, key):
        x, y = res[prefix + a][key], res[prefix + b][key]
        return None if x is None or y is None else x / y
    out = {}
    for n in processes:
        out[f"fliqs_vs_qat_step_time@{n}"] = ratio(f"fliqs@{n}", f"qat:int4@{n}", "ms_per_step")
        out[f"fliqs_vs_qat_cpu_time@{n}"] = ratio(f"fliqs@{n}", f"qat:int4@{n}", "cpu_ms_per_step")
        for m in (m for m, k in RUN_METHODS if k == n and prefix + f"{m}@{n}" in res):
            out[f"{m}_vs_qat_step_time@{n}"] = ratio(f"{m}@{n}", f"qat:int4@{n}", "ms_per_step")
    if 1 in processes and 2 in processes:
        out["fliqs_throughput_2_vs_1"] = ratio("fliqs@2", "fliqs@1", "images_per_s")
        out["qat_throughput_2_vs_1"] = ratio("qat:int4@2", "qat:int4@1", "images_per_s")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--processes", default="1,2", help="process counts to run (comma-separated)")
    ap.add_argument("--before", default=None, metavar="DIR",
                    help="also run DIR's bench/search_throughput.py (an earlier checkout) in the same rounds")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.steps, a.warmup, a.batch)
        return
    processes = [int(n) for n in a.processes.split(",")]
    methods = [(m, n) for m, n in METHODS if n in processes]
    only_here = [(m, n) for m, n in RUN_METHODS if n in processes]
    trees = {"": __file__}
    if a.before:
        script = Path(a.before) / "bench" / "search_throughput.py"
        if not script.exists():
            raise SystemExit(f"--before {a.before}: no bench/search_throughput.py there; give a checkout of this repository")
        trees["before:"] = str(script)
    runs = {f"{t}{m}@{n}": [] for t in trees for m, n in methods}
    runs.update({f"{m}@{n}": [] for m, n in only_here})
    for _ in range(a.repeats):
        for m, n in methods:
            for t, script in trees.items():
                runs[f"{t}{m}@{n}"].append(_run(m, n, a, script))
        for m, n in only_here:
            runs[f"{m}@{n}"].append(_run(m, n, a))
    res = _summary(runs)
    ratios = {f"{t}{k}": v for t in trees for k, v in _ratios(res, t, processes).items()}
    print(f"ResNet-8 (BN folded), Fashion-MNIST 28x28, global batch {a.batch}, {a.steps} timed steps "
          f"x {a.repeats} rounds, {os.cpu_count()} cores (threads per process: cores / processes)")
    print(f"{'method@processes':26s} {'ms/step':>9s} {'CPU ms':>9s} {'images/s':>9s} {'threads':>8s} {'load':>6s}")
    for k, r in res.items():
        cpu = "-" if r["cpu_ms_per_step"] is None else f"{r['cpu_ms_per_step']:.1f}"
        load = "-" if r["load_avg_1m"] is None else f"{r['load_avg_1m']:.1f}"
        print(f"{k:26s} {r['ms_per_step']:9.1f} {cpu:>9s} {r['images_per_s']:9.0f} "
              f"{r['threads_per_process']:8d} {load:>6s}")
    for k, v in ratios.items():
        print(f"{k:36s} {'-' if v is None else f'{v:6.2f}'}")
    if a.before:
        for n in processes:
            for m in ("qat:int4", "fliqs"):
                print(f"after / before {m}@{n}: wall {res[f'{m}@{n}']['ms_per_step'] / res[f'before:{m}@{n}']['ms_per_step']:.2f}")
    out = {"config": {"batch": a.batch, "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
                      "cores": os.cpu_count(), "formats": FORMATS, "backend": "gloo",
                      "model": "ResNet-8 (BN folded), 1x28x28", "before": a.before},
           "results": res, "ratios": ratios, "runs": runs}
    if a.json:
        from fliqs_compiler.base import atomic
        atomic.write_text(Path(a.json), json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
