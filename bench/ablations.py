"""FLIQS ablations on Fashion-MNIST: what each part of the search recipe does.

Every variant starts from the same float ResNet-8 (``bench/quality.py``'s, cached), the same
data, budget, steps and seeds, and changes ONE thing from the default recipe (``SearchOptions()``
as shipped); ``tunas 2023`` is the recipe before the rework (uniform 25 % warmup, no final
stretch, raw advantage, no distillation — the scale fixes stay, they are not optional).
Reported per variant (mean ± std over ``--seeds``): test accuracy of the returned configuration
with the one-shot weights (no retraining), its cost / budget, how decided the policy is
(mean max-probability), and seconds. Writes ``bench/results/ablations.json``. 2 threads.

    python bench/ablations.py [--steps 300] [--seeds 2] [--budget bops=0.14x] [--variants a,b]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: examples/


os.environ.setdefault("OMP_NUM_THREADS", "2")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SPACES, bench_options, float_model, load_fmnist  # noqa: E402

from fliqs_compiler.search import run_search  # noqa: E402
from examples.toy_models import make_searchable  # noqa: E402

# name -> (SearchOptions overrides, TrainOptions overrides, ControllerOptions overrides)
VARIANTS = {
    "default": ({}, {}, {}),
    "no sensitivity prior": ({"prior": "none"}, {}, {"warmup": 0.15}),
    "prior after a progressive warmup": ({"prior_at": "search"}, {}, {"warmup": 0.15}),
    "15 % progressive warmup": ({}, {}, {"warmup": 0.15}),
    "no distillation": ({}, {"distill": 0.0}, {}),
    "cosine LR": ({}, {"lr_schedule": "cosine"}, {}),
    "uniform warmup": ({"warmup_sampling": "uniform"}, {}, {"warmup": 0.15}),
    "no final stretch": ({}, {}, {"freeze": 1.0}),
    "raw advantage": ({}, {}, {"advantage": "raw"}),
    "4 reward samples": ({"reward_samples": 4}, {}, {}),
    "gamma 1.0": ({"gamma": 1.0}, {}, {}),
    "tunas 2023": ({"warmup_sampling": "uniform", "prior": "none"}, {"distill": 0.0},
                   {"freeze": 1.0, "advantage": "raw", "warmup": 0.25, "entropy_max": 0.1}),
}


def variant_options(base, name: str, seed: int):
    s, t, c = VARIANTS[name]
    return replace(base, seed=seed, train=replace(base.train, **t),
                   controller=replace(base.controller, **c), **s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--space", default="int", choices=list(SPACES))
    ap.add_argument("--budget", default="bops=0.14x")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ablations.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    data = load_fmnist(seed=0)
    model = float_model(data, 10, 128, 0, 16)
    base = bench_options(a.steps)
    out = Path(a.out)
    done = json.loads(out.read_text()).get("variants", {}) if out.exists() else {}
    rows = {k: v for k, v in done.items() if v.get("steps") == a.steps and v.get("budget") == a.budget}
    for name in a.variants.split(","):
        if name in rows and len(rows[name]["seeds"]) >= a.seeds:
            continue  # resumable: finished variants are kept
        per_seed = []
        for seed in range(a.seeds):
            g = make_searchable(model, data.x_train[:1], SPACES[a.space], name="ablation")
            r = run_search(g, data, a.budget, variant_options(base, name, seed), progress=False)
            per_seed.append({"seed": seed, "accuracy": r.quality["final"], "cost_ratio": r.cost / r.budget_target,
                             "decided": statistics.fmean(max(p) for p in r.probabilities),
                             "seconds": r.seconds, "formats": r.formats, "schedule": r.schedule})
        acc = [s["accuracy"] for s in per_seed]
        rows[name] = {"accuracy": statistics.fmean(acc), "accuracy_sd": statistics.pstdev(acc),
                      "cost_ratio": statistics.fmean(s["cost_ratio"] for s in per_seed),
                      "decided": statistics.fmean(s["decided"] for s in per_seed),
                      "seconds": statistics.fmean(s["seconds"] for s in per_seed), "steps": a.steps,
                      "budget": a.budget, "space": a.space, "seeds": per_seed}
        r = rows[name]
        print(f"{name:18s} acc {r['accuracy'] * 100:6.2f} ± {r['accuracy_sd'] * 100:4.2f} %  "
              f"cost/budget {r['cost_ratio']:.3f}  policy max-p {r['decided']:.2f}  {r['seconds']:.0f} s",
              flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"data": "fashion-mnist", "model": "ResNet-8 w16", "threads": 2,
                                   "variants": rows}, indent=1))
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
