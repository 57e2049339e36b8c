"""Search overhead: one FLIQS step vs one single-format QAT step vs one DNAS (K-branch) step.

Each method runs in its own fresh process (so peak-memory numbers do not mix): build the same
searchable ResNet-8 (Fashion-MNIST shape, BN folded) over K formats, take ``--warmup`` untimed
steps, then time ``--steps`` steps (median ms/step) and read the peak RSS growth over the
steps' start (``ru_maxrss`` minus the RSS before the first step: activations, gradients,
optimizer state). CPU time per step (this process's threads) is printed next to the wall time:
less hit by other jobs on a shared machine. Goal (ours; docs/method.md "One-shot" says why): FLIQS ≤ 1.10× the time and ≤ 1.05× the memory of QAT;
DNAS ≈ K× activation memory. 2 threads everywhere.

    python bench/search_overhead.py [--steps 30] [--batch 128] [--json out.json]
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


os.environ.setdefault("OMP_NUM_THREADS", "2")
FORMATS = ["int2", "int4", "int8", "fp8_e4m3"]
# fliqs: held-out reward batch as large as the training batch (default); fliqs_quarter: held-out
# batch of batch/4 (SearchOptions.reward_batch_size); fliqs_trainbatch: reward on the step's batch.
METHODS = [f"qat:{f}" for f in FORMATS] + ["fliqs", "fliqs_quarter", "fliqs_trainbatch", "dnas"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(method: str, steps: int, warmup: int, batch: int) -> dict:
    import torch
    torch.set_num_threads(2)
    from fliqs_compiler.data.sources import load_data
    from fliqs_compiler.ir.graph import InputSpec
    from fliqs_compiler.search import OneShotSearch, SearchOptions, TrainOptions
    from fliqs_compiler.search.baselines import dnas_wrap
    from examples.toy_models import ResNet8, fuse_bn, make_searchable
    from fliqs_compiler.search.trainer import WeightTrainer

    torch.manual_seed(0)
    data = load_data("fashion-mnist", InputSpec("x", (1, 1, 28, 28)), limit=4096)
    graph = make_searchable(fuse_bn(ResNet8()), data.x_train[:1], FORMATS, name="resnet8")
    reward_size = batch // 4 if method == "fliqs_quarter" else batch
    opts = SearchOptions(steps=10 ** 6, train=TrainOptions(batch_size=batch), reward_batch_size=reward_size,
                         reward_batch="train" if method == "fliqs_trainbatch" else "heldout",
                         weights_follow="sample" if method == "fliqs_trainbatch" else "policy")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every candidate's scales initialised before anything is timed
        for fmt in FORMATS:
            graph.space.apply(graph.gm, graph.space.uniform_choice(fmt))
            graph.gm(data.x_train[:batch])
    if method.startswith("fliqs"):
        search = OneShotSearch(graph, data, "bops=0.3x", opts)
        # past the warmup: the policy samples and learns, as in most of a search
        step_fn = lambda i: search.step(search.controller.warmup_steps + i)  # noqa: E731
    elif method.startswith("qat:"):
        trainer = WeightTrainer(graph.gm, data, opts.train)
        graph.space.apply(graph.gm, graph.space.uniform_choice(method[4:]))
        step_fn = lambda i: trainer.step(gen)  # noqa: E731
    else:  # dnas: all K candidates of every quantizer run and are mixed
        g, alphas = dnas_wrap(graph)
        trainer = WeightTrainer(g.gm, data, opts.train)
        aopt = torch.optim.Adam([alphas], lr=0.01)

        def step_fn(i):
            aopt.zero_grad(set_to_none=True)
            trainer.step(gen)
            aopt.step()
    import gc
    gc.collect()
    _reset_peak()
    rss0 = _status_kb("VmRSS")
    times, cpu = [], []
    for i in range(warmup + steps):
        t, c = time.perf_counter(), time.process_time()
        step_fn(i)
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
            cpu.append((time.process_time() - c) * 1e3)
    peak = _status_kb("VmHWM")
    return {"method": method, "ms_per_step": statistics.median(times), "ms_mean": statistics.fmean(times),
            "cpu_ms_per_step": statistics.median(cpu), "load_avg_1m": os.getloadavg()[0],
            "peak_rss_mb": peak / 1024, "step_mem_mb": (peak - rss0) / 1024, "steps": steps,
            "batch": batch, "threads": torch.get_num_threads(), "formats": FORMATS}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="alternate the methods this many rounds")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.steps, a.warmup, a.batch)))
        return
    rows = {m: [] for m in METHODS}
    for _ in range(a.repeats):  # interleave, so machine load hits every method alike
        for m in METHODS:
            p = subprocess.run([sys.executable, __file__, "--worker", m, "--steps", str(a.steps),
                                "--warmup", str(a.warmup), "--batch", str(a.batch)],
                               capture_output=True, text=True, check=True)
            rows[m].append(json.loads(p.stdout.strip().splitlines()[-1]))
    res = {m: {"ms_per_step": statistics.median(r["ms_per_step"] for r in rs),
               "cpu_ms_per_step": statistics.median(r["cpu_ms_per_step"] for r in rs),
               "step_mem_mb": statistics.median(r["step_mem_mb"] for r in rs),
               "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)} for m, rs in rows.items()}
    qat = [m for m in res if m.startswith("qat:")]
    q = {k: statistics.fmean(res[m][k] for m in qat) for k in ("ms_per_step", "cpu_ms_per_step", "step_mem_mb")}
    res["qat:mean"] = dict(q, peak_rss_mb=statistics.fmean(res[m]["peak_rss_mb"] for m in qat))
    print(f"ResNet-8 (BN folded), Fashion-MNIST 28x28, batch {a.batch}, K={len(FORMATS)} formats "
          f"{FORMATS}, 2 threads, {a.steps} timed steps x {a.repeats} round(s); ratios vs the mean "
          "single-format QAT step (FLIQS samples a mix of the formats)")
    print(f"{'method':18s} {'ms/step':>9s} {'x QAT':>7s} {'CPU ms':>8s} {'x QAT':>7s} {'step mem MB':>12s} "
          f"{'x QAT':>7s} {'peak RSS MB':>12s}")
    for m, r in res.items():
        print(f"{m:18s} {r['ms_per_step']:9.1f} {r['ms_per_step'] / q['ms_per_step']:7.2f} "
              f"{r['cpu_ms_per_step']:8.1f} {r['cpu_ms_per_step'] / q['cpu_ms_per_step']:7.2f} "
              f"{r['step_mem_mb']:12.1f} {r['step_mem_mb'] / max(q['step_mem_mb'], 1e-9):7.2f} "
              f"{r['peak_rss_mb']:12.1f}")
    out = {"config": {"batch": a.batch, "steps": a.steps, "repeats": a.repeats, "threads": 2,
                      "formats": FORMATS, "model": "ResNet-8 (BN folded), 1x28x28",
                      "memory": "VmHWM growth over the timed steps (peak reset before the first step)"},
           "results": res, "runs": rows,
           "ratios_vs_qat_mean": {m: {"time": r["ms_per_step"] / q["ms_per_step"],
                                      "cpu_time": r["cpu_ms_per_step"] / q["cpu_ms_per_step"],
                                      "memory": r["step_mem_mb"] / max(q["step_mem_mb"], 1e-9)}
                                  for m, r in res.items()}}
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
