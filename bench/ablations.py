"""FLIQS ablations: entropy schedule (cosine / constant / none), warmup (0 vs 25 %), tied vs untied
weight/activation decisions. Same float model, data, budget, steps and seeds for every variant.

Reported per variant (mean over ``--seeds``): final test accuracy of the argmax configuration
(no retraining), its cost relative to the budget, the final policy's mean max-probability
(how decided it is), and seconds. Default: TinyCNN on sklearn digits (fast); ``--data
fashion-mnist`` uses a width-8 ResNet-8. Writes ``bench/results/ablations.json``. 2 threads.

    python bench/ablations.py [--steps 200] [--seeds 3] [--budget bops=0.3x]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
import torch  # noqa: E402

from fliqs_compiler.data import load_data  # noqa: E402
from fliqs_compiler.graph import InputSpec  # noqa: E402
from fliqs_compiler.search import ControllerOptions, SearchOptions, TrainOptions, run_search  # noqa: E402
from fliqs_compiler.search.toy import ResNet8, TinyCNN, fuse_bn, make_searchable, train_float  # noqa: E402

FORMATS = ["int2", "int4", "int8", "fp4_e2m1", "fp8_e4m3"]
VARIANTS = {  # name -> (controller option overrides, tied)
    "cosine (default)": ({}, True),
    "constant entropy": ({"entropy_schedule": "constant"}, True),
    "no entropy term": ({"entropy_schedule": "none"}, True),
    "warmup 0": ({"warmup": 0.0}, True),
    "untied w/a": ({}, False),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", default="bops=0.3x")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ablations.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    if a.data == "digits":
        data = load_data("digits", InputSpec("x", (1, 1, 8, 8)))
        model = train_float(TinyCNN(), data.x_train, data.y_train, 300, seed=0)
    else:
        data = load_data("fashion-mnist", InputSpec("x", (1, 1, 28, 28)), mean=0.2860, std=0.3530, limit=12000)
        model = fuse_bn(train_float(ResNet8(width=8), data.x_train, data.y_train, 300, seed=0))
    base = SearchOptions(steps=a.steps, gamma=1.0, reward_batch_size=128, checkpoint_every=10 ** 9,
                         train=TrainOptions(batch_size=64, lr=5e-4),
                         controller=ControllerOptions(lr=0.05, entropy_max=0.1))
    rows = {}
    for name, (over, tied) in VARIANTS.items():
        per_seed = []
        for seed in range(a.seeds):
            g = make_searchable(model, data.x_train[:1], FORMATS, tied=tied, name="ablation")
            opts = replace(base, seed=seed, controller=replace(base.controller, **over))
            r = run_search(g, data, a.budget, opts, progress=False)
            per_seed.append({"accuracy": r.quality["final"], "cost_ratio": r.cost / r.budget_target,
                             "decided": statistics.fmean(max(p) for p in r.probabilities),
                             "seconds": r.seconds, "formats": r.formats})
        rows[name] = {"accuracy": statistics.fmean(s["accuracy"] for s in per_seed),
                      "accuracy_sd": statistics.pstdev(s["accuracy"] for s in per_seed),
                      "cost_ratio": statistics.fmean(s["cost_ratio"] for s in per_seed),
                      "decided": statistics.fmean(s["decided"] for s in per_seed),
                      "seconds": statistics.fmean(s["seconds"] for s in per_seed), "seeds": per_seed}
        r = rows[name]
        print(f"{name:18s} acc {r['accuracy'] * 100:6.2f} ± {r['accuracy_sd'] * 100:4.2f} %  "
              f"cost/budget {r['cost_ratio']:.2f}  policy max-p {r['decided']:.2f}  {r['seconds']:.0f} s",
              flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"data": a.data, "steps": a.steps, "seeds": a.seeds, "budget": a.budget,
                               "formats": FORMATS, "threads": 2, "variants": rows}, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
