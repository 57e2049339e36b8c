"""Quality benchmark on Fashion-MNIST: FLIQS vs baselines at equal BOPs, INT / FP / mixed spaces.

1. Train a float ResNet-8 (BatchNorm, Adam, cosine LR; cached under ~/.cache/fliqs) and fold BN.
2. For each space (int: int2/3/4/8, fp: fp4_e2m1/fp6_e3m2/fp8_e4m3, mixed: both) and each BOPs
   budget (fractions of the all-INT8 BOPs): FLIQS one-shot search (no retraining) and the
   baselines in the same harness (random search, sensitivity+ILP; DNAS with --dnas), each with
   the same number of steps; uniform QAT per format once per space (no budget).
3. Accuracy on the official test split; writes ``bench/results/quality.json``
   (``{"float_accuracy", "runs": [{method, space, formats, budget_bops, bops, accuracy, steps,
   seconds}]}``), ``quality_details.json`` (chosen per-layer formats, notes) and ``quality.png``
   (accuracy vs BOPs per space).

    python bench/quality.py --quick            # reduced run (width 8; ~20 min on a shared 2-core box)
    python bench/quality.py --epochs 10 --steps 600 --budgets 0.3,0.45,0.6 --dnas
Requires ``apt-get install -y dataset-fashion-mnist``. 2 threads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
import torch  # noqa: E402

from fliqs_compiler.budget import parse_budget, resolve_budget  # noqa: E402
from fliqs_compiler.data import load_data  # noqa: E402
from fliqs_compiler.errors import FliqsError  # noqa: E402
from fliqs_compiler.graph import InputSpec  # noqa: E402
from fliqs_compiler.search import ControllerOptions, SearchOptions, TrainOptions, run_search  # noqa: E402
from fliqs_compiler.search import baselines as B  # noqa: E402
from fliqs_compiler.search.toy import ResNet8, evaluate_float, fuse_bn, make_searchable, train_float  # noqa: E402

SPACES = {
    "int": ["int2", "int3", "int4", "int8"],
    "fp": ["fp4_e2m1", "fp6_e3m2", "fp8_e4m3"],
    "mixed": ["int2", "int3", "int4", "int8", "fp4_e2m1", "fp6_e3m2", "fp8_e4m3"],
}
RESULTS = Path(__file__).resolve().parent / "results"


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def float_model(data, epochs: float, batch: int, seed: int, width: int = 16):
    """Trained ResNet-8 (cached by epochs/batch/seed/width), BN folded."""
    cache = Path.home() / ".cache" / "fliqs" / f"resnet8w{width}_fmnist_e{epochs}_b{batch}_s{seed}.pt"
    model = ResNet8(width=width)
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
    else:
        steps = int(epochs * len(data.x_train) / batch)
        t = time.perf_counter()
        train_float(model, data.x_train, data.y_train, steps, batch_size=batch, lr=3e-3, seed=seed,
                    progress=True)
        print(f"float training: {steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return fuse_bn(model.eval())


def pareto_png(runs, float_acc, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    marks = {"fliqs": "o", "uniform": "s", "random": "^", "ilp": "D", "dnas": "v"}
    colours = dict(zip(marks, ["C0", "C1", "C2", "C3", "C4"]))
    present = [s for s in SPACES if any(r["space"] == s for r in runs)]
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, space in zip(axes, present):
        for method, mk in marks.items():
            pts = sorted((r["bops"] / 1e6, r["accuracy"] * 100) for r in runs if r["method"] == method
                         and (r["space"] == space or (method == "uniform" and space == "mixed")))
            if pts:
                ax.plot(*zip(*pts), marker=mk, color=colours[method], label=method,
                        linestyle="-" if method == "fliqs" else "")
        ax.axhline(float_acc * 100, color="grey", linestyle=":", label="float")
        ax.set_title(f"{space} space")
        ax.set_xlabel("MBOPs (searched layers, batch 1)")
        ax.set_xscale("log")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced run: width-8 ResNet-8, 1 float epoch, "
                    "100 steps, batch 64, 1000 test images, int+fp spaces, fliqs/uniform/ilp only")
    ap.add_argument("--width", type=int, default=None, help="ResNet-8 base width (default 16; quick 8)")
    ap.add_argument("--epochs", type=float, default=None, help="float training epochs (default 10; quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="search/QAT steps per run (default 600; quick 80)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--budgets", default="0.3,0.45,0.6", help="BOPs budgets as fractions of all-INT8")
    ap.add_argument("--spaces", default=None, help=f"comma list of {', '.join(SPACES)} (default all; quick int,fp)")
    ap.add_argument("--methods", default=None, help="comma list of fliqs,uniform,random,ilp,dnas")
    ap.add_argument("--dnas", action="store_true", help="also run the DNAS baseline")
    ap.add_argument("--finetune", type=int, default=0,
                    help="also fine-tune each FLIQS result N steps (the no-retraining goal compares them)")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--replot", action="store_true", help="only redraw quality.png from quality.json")
    a = ap.parse_args(argv)
    if a.replot:
        res = json.loads((Path(a.out) / "quality.json").read_text())
        return pareto_png(res["runs"], res["float_accuracy"], Path(a.out) / "quality.png")
    torch.set_num_threads(2)
    epochs = a.epochs if a.epochs is not None else (1 if a.quick else 10)
    steps = a.steps if a.steps is not None else (100 if a.quick else 600)
    width = a.width if a.width is not None else (8 if a.quick else 16)
    batch = a.batch if a.batch is not None else (64 if a.quick else 128)
    methods = (a.methods.split(",") if a.methods else
               ["fliqs", "uniform", "ilp"] + ([] if a.quick else ["random"])) + (["dnas"] if a.dnas else [])
    test_limit = a.test_limit if a.test_limit is not None else (1000 if a.quick else None)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_data("fashion-mnist", InputSpec("x", (1, 1, 28, 28)), holdout=0.1, seed=a.seed,
                     mean=0.2860, std=0.3530)
    model = float_model(data, epochs, 128, a.seed, width)
    if test_limit:
        data.x_test, data.y_test = data.x_test[:test_limit], data.y_test[:test_limit]
    float_acc = evaluate_float(model, data.x_test, data.y_test)
    print(f"float ResNet-8 width {width} (BN folded): test accuracy {float_acc * 100:.2f} % "
          f"({len(data.x_test)} test images; {epochs} epochs)", flush=True)
    opts = SearchOptions(steps=steps, seed=a.seed, gamma=1.0, reward_batch_size=128, checkpoint_every=10 ** 9,
                         train=TrainOptions(batch_size=batch, lr=2e-4),
                         controller=ControllerOptions(lr=0.1, entropy_max=0.1))
    runs, details = [], []

    def record(method, space, formats, budget_bops, bops, acc, seconds, extra):
        run = {"method": method, "space": space, "formats": list(formats),
               "budget_bops": None if budget_bops is None else int(round(budget_bops)),
               "bops": int(round(bops)), "accuracy": float(acc), "steps": int(steps), "seconds": float(seconds)}
        runs.append(run)
        details.append(dict(run, **extra))
        print(f"{method:8s} {space:6s} budget={'-' if budget_bops is None else f'{budget_bops / 1e6:.3f}M':>8s} "
              f"bops={bops / 1e6:8.3f}M acc={acc * 100:6.2f} % ({seconds:.0f} s)", flush=True)
        _atomic_json(out / "quality.json", {"float_accuracy": float_acc, "runs": runs})
        _atomic_json(out / "quality_details.json", {"float_accuracy": float_acc, "threads": 2, "epochs": epochs,
                                                    "steps": steps, "batch": batch, "width": width,
                                                    "runs": details})

    spaces = a.spaces.split(",") if a.spaces else (["int", "fp"] if a.quick else list(SPACES))
    for space in spaces:
        fmts = SPACES[space]
        base = make_searchable(model, data.x_train[:1], fmts, name=f"resnet8-{space}")
        done = {f for r in runs if r["method"] == "uniform" for f in r["formats"]}
        if "uniform" in methods and not set(fmts) <= done:  # mixed = int ∪ fp: already measured
            for r in B.uniform(base, data, None, opts, formats=[f for f in fmts if f not in done]):
                record("uniform", space, [r.name.split("-", 1)[1]], None, r.cost, r.quality, r.seconds,
                       {"notes": r.notes})
        for frac in [float(f) for f in a.budgets.split(",")]:
            budget = parse_budget(f"bops={frac}x")
            try:
                target = resolve_budget(budget, base)
            except FliqsError as e:  # e.g. 0.14x in the FP space: fp4 everywhere is 0.25x
                print(f"skip {space} {frac}x: {e}", flush=True)
                continue
            if "fliqs" in methods:
                g = make_searchable(model, data.x_train[:1], fmts, name=f"resnet8-{space}")
                res = run_search(g, data, budget, dataclasses.replace(opts, finetune=a.finetune),
                                 progress=False)
                extra = {"chosen": res.formats, "budget": f"{frac}x"}
                if a.finetune:
                    extra.update(accuracy_finetuned=res.quality["final_finetuned"],
                                 finetune_steps=a.finetune)
                record("fliqs", space, fmts, target, res.cost, res.quality["final"], res.seconds, extra)
            for name in ("random", "ilp", "dnas"):
                if name in methods:
                    r = B.BASELINES[name](base, data, budget, opts)
                    record(name, space, fmts, target, r.cost, r.quality, r.seconds,
                           {"chosen": r.formats, "budget": f"{frac}x", "notes": r.notes})
    pareto_png(runs, float_acc, out / "quality.png")
    print(f"wrote {out / 'quality.json'} and {out / 'quality.png'}")


if __name__ == "__main__":
    sys.exit(main())
