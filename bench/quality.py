"""Quality benchmark on Fashion-MNIST: FLIQS vs baselines at equal BOPs, under one fair protocol.

Protocol (every method, every row):
- one float ResNet-8 (BatchNorm, Adam, 10 epochs; cached under ~/.cache/fliqs), BN folded,
  exported to ONNX and brought in through the real pipeline (``fq.load`` + ``passes.prepare``,
  every conv/linear searched, first and last included);
- the same data, the same ``TrainOptions`` (optimizer, LR, MSE scale initialisation, log-scale
  learning, distillation from the float model) and the same number of weight-update steps:
  ILP's sensitivity passes and random search's trials are charged against it;
- every returned configuration meets its budget (FLIQS and DNAS project their argmax; random
  samples near the budget; a uniform format counts only if it fits within 2 %); each row
  reports the BOPs it really uses;
- every accuracy is measured on the 10k test images from the exported ``model.qdq.onnx`` in a
  DEFAULT ``onnxruntime.InferenceSession`` (FP4 Q/DQ, which ORT cannot run, from the torch graph,
  marked ``evaluated_by``);
- two numbers for FLIQS: the one-shot weights as they come out (``fliqs``, no retraining) and
  its configuration retrained with the same N-step QAT as the baselines (``fliqs-config``).
Seeds (``--seeds``), step counts (``--steps 300,900``), budgets per space. ``quality.json`` keeps
one row per (space, budget, method, seed, steps) — ``bops``, ``accuracy``, ``steps``, ``seconds`` —
and the run resumes from it (finished rows are skipped). ``quality.png``: accuracy vs BOPs.

    python bench/quality.py --quick                       # small smoke run
    python bench/quality.py --seeds 3 --steps 300,900 --spaces int,fp,mixed
    python bench/quality.py --model vit --seeds 1 --steps 300   # the ViT: quality_vit.json

``--model vit``: ``examples.toy_models.ViT`` (4 blocks, 64 wide, 4 heads, 49 patch tokens + a
class token), trained the same way (Adam, cosine LR, 8 epochs, lr 1e-3), its attention MatMuls
searched (the softmax output only at >= 8 bits), LayerNorm / softmax / GELU in float; space
``vit`` = int4, int8, fp8_e4m3; budgets 0.35x, 0.5x, 0.7x of all-INT8 BOPs (the cheapest
configuration is 0.31x: all int4 but the softmax side of A·V, int8 by the operand rule).
Requires ``apt-get install -y dataset-fashion-mnist``. 2 threads (``--threads``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: examples/


os.environ.setdefault("OMP_NUM_THREADS", "2")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fliqs_compiler.cost.budget import meets_budget, parse_budget, resolve_budget  # noqa: E402
from fliqs_compiler.cost.model import config_cost  # noqa: E402
from fliqs_compiler.data.sources import load_data  # noqa: E402
from fliqs_compiler.base.errors import FliqsError  # noqa: E402
from fliqs_compiler.ir.graph import InputSpec  # noqa: E402
from fliqs_compiler.search import SearchOptions, run_search  # noqa: E402
from fliqs_compiler.search.oneshot import recipe_train  # noqa: E402
from fliqs_compiler.search import baselines as B  # noqa: E402
from examples.toy_models import ResNet8, ViT, evaluate_float, fuse_bn, train_float  # noqa: E402

SPACES = {
    "int": ["int2", "int3", "int4", "int8"],
    "fp": ["fp4_e2m1", "fp6_e3m2", "fp8_e4m3"],
    "mixed": ["int2", "int3", "int4", "int8", "fp4_e2m1", "fp6_e3m2", "fp8_e4m3"],
    "vit": ["int4", "int8", "fp8_e4m3"],
}
# Spaces whose layers choose the weight's and the activation's format separately (two decisions
# per layer instead of one): W2A4 and the like, where an additive sensitivity model is most likely
# to mis-rank combinations.
SPACES["int-untied"] = SPACES["int"]
UNTIED = {"int-untied"}
BUDGETS = {"int": [0.14, 0.25, 0.45], "int-untied": [0.14, 0.25, 0.45], "fp": [0.25, 0.35, 0.45], "mixed": [0.14, 0.25, 0.45],
           "vit": [0.35, 0.5, 0.7]}


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A benchmarked float model: how it is built and trained, its default spaces, its file."""

    name: str
    build: object  # () -> nn.Module
    epochs: float
    lr: float
    fold_bn: bool
    spaces: str
    results: str  # the quality JSON's file name


MODELS = {
    "resnet8": BenchModel("ResNet-8", lambda: ResNet8(width=16), 10, 3e-3, True, "int,fp", "quality.json"),
    "vit": BenchModel("ViT", ViT, 8, 1e-3, False, "vit", "quality_vit.json"),
}
RESULTS = Path(__file__).resolve().parent / "results"


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load_fmnist(seed: int = 0, limit=None):
    return load_data("fashion-mnist", InputSpec("x", (1, 1, 28, 28)), holdout=0.1, seed=seed,
                     mean=0.2860, std=0.3530, limit=limit)


def bench_options(steps: int, seed: int = 0, lr_schedule: str = "constant",
                  overrides: dict | None = None) -> SearchOptions:
    """The one training/search setting every method shares (the package defaults, batch 128;
    ``lr_schedule`` for every method alike); ``overrides``: ``{"controller.freeze": 0.25,
    "reward_metric": "neg_kl", ...}`` replacing the recipe's search settings (ablations of FLIQS
    alone: ``--search``)."""
    opts = SearchOptions(steps=steps, seed=seed, reward_batch_size=256, checkpoint_every=10 ** 9,
                         train=dataclasses.replace(recipe_train(), batch_size=128, lr=2e-4,
                                                   lr_schedule=lr_schedule))
    for key, value in (overrides or {}).items():
        part, _, field = key.rpartition(".")
        if part:  # controller.* / train.*: a nested options dataclass
            setattr(opts, part, dataclasses.replace(getattr(opts, part), **{field: value}))
        else:
            opts = dataclasses.replace(opts, **{field: value})
    return opts


def parse_overrides(items) -> dict:
    """``["controller.freeze=0.25", "reward_metric=neg_kl"]`` -> typed dict, checked against
    ``SearchOptions`` (and its ``controller`` / ``train`` parts) before any work."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        part, _, field = key.rpartition(".")
        holder = getattr(SearchOptions(), part) if part in ("controller", "train") else SearchOptions()
        if not sep or part not in ("", "controller", "train") or not hasattr(holder, field):
            raise SystemExit(f"--search {item!r}: use FIELD=VALUE with a SearchOptions field, or "
                             f"controller.FIELD / train.FIELD")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare string (e.g. reward_metric=neg_kl)
    return out


def variant_label(overrides: dict) -> str:
    """Row-method suffix of a FLIQS ablation: ``@freeze0.25`` (the older ``--freeze`` rows),
    ``@freeze0.25,reward_metric=neg_kl``; empty for the recipe."""
    parts = [f"freeze{v:g}" if k == "controller.freeze" else f"{k.rpartition('.')[2]}={v}"
             for k, v in overrides.items()]
    return "@" + ",".join(parts) if parts else ""


def float_model(data, epochs: float, batch: int, seed: int, key: str = "resnet8"):
    """The trained float model (cached by model/epochs/batch/seed), BN folded (ResNet-8)."""
    spec = MODELS[key]
    stem = "resnet8w16" if key == "resnet8" else key  # the ResNet-8 cache keeps its old name
    cache = Path.home() / ".cache" / "fliqs" / f"{stem}_fmnist_e{epochs}_b{batch}_s{seed}.pt"
    model = spec.build()
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
    else:
        steps = int(epochs * len(data.x_train) / batch)
        t = time.perf_counter()
        train_float(model, data.x_train, data.y_train, steps, batch_size=batch, lr=spec.lr, seed=seed,
                    progress=True)
        print(f"float training: {steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return fuse_bn(model.eval()) if spec.fold_bn else model.eval()


def pareto_png(rows, float_acc, path: Path) -> None:
    """Accuracy vs BOPs per space at the longest schedule; mean over seeds per point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    marks = {"fliqs": "o", "fliqs-config": "P", "fliqs+ft": "X", "uniform": "s", "random": "^", "ilp": "D", "dnas": "v"}
    present = [s for s in SPACES if any(r["space"] == s for r in rows)]
    if not present:
        return
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4), sharey=True, squeeze=False)
    for ax, space in zip(axes[0], present):
        steps = max(r["steps"] for r in rows if r["space"] == space)
        for i, (method, mk) in enumerate(marks.items()):
            groups: dict = {}
            for r in rows:
                m = r["method"].split("-")[0] if r["method"].startswith("uniform-") else r["method"]
                m = "fliqs+ft" if m.startswith("fliqs+ft") else m
                if m == method and r["space"] == space and r["steps"] == steps:
                    groups.setdefault((r["budget"], r["method"]), []).append(r)
            pts = sorted((statistics.fmean(r["bops"] for r in g) / 1e6,
                          statistics.fmean(r["accuracy"] for r in g) * 100) for g in groups.values())
            if pts:
                ax.plot(*zip(*pts), marker=mk, color=f"C{i}", label=method,
                        linestyle="-" if method == "fliqs" else "")
        ax.axhline(float_acc * 100, color="grey", linestyle=":", label="float")
        ax.set_title(f"{space} space, {steps} steps")
        ax.set_xlabel("MBOPs (searched layers, batch 1)")
        ax.set_xscale("log")
    axes[0][0].set_ylabel("test accuracy (%), mean over seeds")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def searchable(model, fmts, name: str, cache: Path, tie: bool = True):
    """The float model through the real front door: ONNX export, ``fq.load``, ``prepare``
    (``tie``: one format per layer for weight and activation, else one decision each)."""
    import fliqs_compiler as fq
    from fliqs_compiler.passes import PrepareOptions, prepare
    path = cache / f"{name.split('-')[0]}_float.onnx"
    if not path.exists():
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    g = fq.load(str(path), input_shapes={"x": (1, 1, 28, 28)})
    g = prepare(g, PrepareOptions(formats=list(fmts), keep_float_first=False, keep_float_last=False,
                                  tie_weight_activation=tie))
    g.name = name
    return g


def onnx_accuracy(graph, formats: dict, data, work: Path) -> tuple:
    """Test accuracy of the exported QDQ ONNX in a default onnxruntime session (torch graph
    where ORT cannot load the model, e.g. FP4 Q/DQ) → (accuracy, evaluated_by)."""
    import onnxruntime as ort
    from fliqs_compiler.backends.onnx_export import export_qdq
    from fliqs_compiler.passes import materialize
    fixed = materialize(graph, formats)
    path = export_qdq(fixed, work / "model.qdq.onnx")
    x, y = data.x_test.numpy(), data.y_test.numpy()
    try:
        sess = ort.InferenceSession(str(path))  # default options: what a user runs
    except Exception:  # noqa: BLE001 — ORT has no FLOAT4E2M1 kernel
        with torch.no_grad():
            fixed.gm.eval()
            pred = torch.cat([fixed.gm(data.x_test[i:i + 1000]) for i in range(0, len(x), 1000)]).argmax(1)
        return float((pred == data.y_test).float().mean()), "torch (onnxruntime cannot load it)"
    inp = sess.get_inputs()[0]
    b = inp.shape[0] if isinstance(inp.shape[0], int) else 1000  # a pinned batch runs sample-wise
    pred = np.concatenate([sess.run(None, {inp.name: x[i:i + b]})[0].argmax(1) for i in range(0, len(x), b)])
    return float((pred == y).mean()), "onnxruntime default session"


def run_method(method, graph, data, budget, opts, work):
    """(formats, trained graph, seconds, notes) of one method at one budget."""
    t0 = time.perf_counter()
    if method in ("fliqs", "fliqs-config"):
        g = copy.deepcopy(graph)
        res = run_search(g, data, budget, opts, progress=False)
        if method == "fliqs":
            return res.formats, g, time.perf_counter() - t0, {"schedule": res.schedule}
        choice = graph.space.choice_of(res.formats)  # the configuration, retrained from float
        r = B.fixed(graph, data, choice, opts)
        return r.formats, r.graph, time.perf_counter() - t0, {"search_seconds": res.seconds}
    r = B.BASELINES[method](graph, data, budget, opts)
    return r.formats, r.graph, time.perf_counter() - t0, {"notes": r.notes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 100 steps, int space, 2000 test images")
    ap.add_argument("--model", default="resnet8", choices=list(MODELS))
    ap.add_argument("--epochs", type=float, default=None, help="float training (default: the model's)")
    ap.add_argument("--steps", default=None, help="comma list of step counts (default 300,900; quick 100)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; quick 1)")
    ap.add_argument("--spaces", default=None, help=f"comma list of {', '.join(SPACES)} (default: the model's)")
    ap.add_argument("--budgets", default=None, help="fractions of all-INT8 BOPs (default: per space)")
    ap.add_argument("--methods", default="fliqs,fliqs-config,uniform,ilp,random",
                    help="comma list of fliqs,fliqs-config,uniform,ilp,random,dnas")
    ap.add_argument("--uniform", default=None, help="uniform formats to train (default: all of the space)")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--finetune", type=int, default=0,
                    help="after each fliqs row, fine-tune its one-shot weights N more steps under its "
                         "configuration (row method fliqs+ftN): the no-retraining vs fine-tune goal")
    ap.add_argument("--freeze", type=float, default=None,
                    help="FLIQS policy freeze point (fraction of steps) instead of the recipe's 0.6; "
                         "its rows are named fliqs@freezeF (same as --search controller.freeze=F)")
    ap.add_argument("--search", action="append", default=[], metavar="FIELD=VALUE",
                    help="a FLIQS search setting instead of the recipe's (repeatable; e.g. "
                         "reward_metric=neg_kl, reward_samples=4, controller.freeze=0.25); its rows "
                         "are named fliqs@<settings>")
    ap.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine", "hold-cosine"],
                    help="learning-rate schedule of every method's training (TrainOptions.lr_schedule)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (recorded in the results)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--replot", action="store_true", help="only redraw quality.png from quality.json")
    a = ap.parse_args(argv)
    overrides = parse_overrides(a.search)
    if a.freeze is not None:
        overrides = {"controller.freeze": a.freeze, **overrides}
    spec = MODELS[a.model]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / spec.results
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    rows = [r for r in state.get("rows", []) if "seed" in r]
    if a.replot:
        return pareto_png(rows, state["float_accuracy"], out / spec.results.replace(".json", ".png"))
    torch.set_num_threads(a.threads)
    steps_list = [int(s) for s in (a.steps or ("100" if a.quick else "300,900")).split(",")]
    seeds = range(a.seeds if a.seeds is not None else (1 if a.quick else 3))
    spaces = (a.spaces or (spec.spaces.split(",")[0] if a.quick else spec.spaces)).split(",")
    methods = a.methods.split(",")
    data = load_fmnist(0)
    model = float_model(data, a.epochs if a.epochs is not None else spec.epochs, 128, 0, a.model)
    limit = a.test_limit or (2000 if a.quick else None)
    if limit:
        data.x_test, data.y_test = data.x_test[:limit], data.y_test[:limit]
    float_acc = evaluate_float(model, data.x_test, data.y_test)
    print(f"float {spec.name}: {float_acc * 100:.2f} % on {len(data.x_test)} test images", flush=True)
    work = Path(tempfile.mkdtemp(prefix="fliqs-quality-"))
    done = {(r["space"], r["budget"], r["method"], r["seed"], r["steps"]) for r in rows}

    def record(row):
        rows.append(row)
        _atomic_json(state_path, {"float_accuracy": float_acc, "threads": a.threads, "test_images": len(data.x_test),
                                  "protocol": "bench/quality.py docstring", "rows": rows})
        print(f"{row['space']:5s} {row['budget']:>6s} {row['method']:12s} seed {row['seed']} {row['steps']:4d} steps "
              f"bops={row['bops'] / 1e6:7.2f}M acc={row['accuracy'] * 100:6.2f} % ({row['seconds']:.0f} s)", flush=True)

    for space in spaces:
        graph = searchable(model, SPACES[space], f"{a.model}-{space}", work, tie=space not in UNTIED)
        for steps in steps_list:
            for seed in seeds:
                base_opts = bench_options(steps, seed, a.lr_schedule)
                fliqs_opts = bench_options(steps, seed, a.lr_schedule, overrides)
                if "uniform" in methods:  # once per format: the row is matched to budgets later
                    for fmt in (f for f in SPACES[space] if not a.uniform or f in a.uniform.split(",")):
                        key = (space, "-", f"uniform-{fmt}", seed, steps)
                        if key in done:
                            continue
                        r = B.uniform(graph, data, None, base_opts, formats=[fmt])[0]
                        acc, by = onnx_accuracy(r.graph, r.formats, data, work)
                        record({"space": space, "budget": "-", "method": f"uniform-{fmt}", "seed": seed,
                                "steps": steps, "bops": int(config_cost(graph, r.formats, "bops")),
                                "accuracy": acc, "evaluated_by": by, "seconds": r.seconds})
                for frac in (float(b) for b in (a.budgets.split(",") if a.budgets else BUDGETS[space])):
                    budget = parse_budget(f"bops={frac}x")
                    try:
                        target = resolve_budget(budget, graph)
                    except FliqsError as e:
                        print(f"skip {space} {frac}x: {e}", flush=True)
                        continue
                    for method in (m for m in methods if m != "uniform"):
                        fliqs = method.startswith("fliqs")
                        label = method + variant_label(overrides) if fliqs else method
                        opts = fliqs_opts if fliqs else base_opts
                        key = (space, f"{frac}x", label, seed, steps)
                        if key in done:
                            continue
                        formats, g, secs, extra = run_method(method, graph, data, budget, opts, work)
                        acc, by = onnx_accuracy(g, formats, data, work)
                        bops = config_cost(graph, formats, "bops")
                        base = {"space": space, "budget": f"{frac}x", "budget_bops": int(target),
                                "seed": seed, "steps": steps, "bops": int(bops),
                                "meets_budget": meets_budget(bops, target)}
                        record(dict(base, method=label, accuracy=acc, evaluated_by=by, seconds=secs,
                                    formats=formats, **extra))
                        ft_key = (space, f"{frac}x", f"{label}+ft{a.finetune}", seed, steps)
                        if method == "fliqs" and a.finetune > 0 and ft_key not in done:
                            ft_opts = bench_options(a.finetune, seed, a.lr_schedule)
                            r = B.fixed(graph, data, graph.space.choice_of(formats), ft_opts, start=g)
                            acc, by = onnx_accuracy(r.graph, r.formats, data, work)
                            record(dict(base, method=ft_key[2], accuracy=acc, evaluated_by=by,
                                        seconds=r.seconds, finetune_steps=a.finetune))
    pareto_png(rows, float_acc, out / spec.results.replace(".json", ".png"))
    print(summary(rows, float_acc))
    print(f"wrote {state_path} and {out / spec.results.replace('.json', '.png')}")


def summary(rows, float_acc) -> str:
    """Markdown: mean ± std over seeds per (space, budget, steps, method); uniform = the best
    uniform format that meets the budget."""
    lines = [f"float {float_acc * 100:.2f} %", "",
             "| space | budget | steps | FLIQS (no retraining) | FLIQS + fine-tune | FLIQS config + QAT | best uniform within budget | ILP + QAT | random |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["space"], r["budget"], r["steps"]) for r in rows if r["budget"] != "-"})

    def cell(sel):
        acc = [r["accuracy"] * 100 for r in sel]
        if not acc:
            return "–"
        bops = statistics.fmean(r["bops"] for r in sel) / 1e6
        sd = statistics.pstdev(acc) if len(acc) > 1 else 0.0
        return f"{statistics.fmean(acc):.2f} ± {sd:.2f} @ {bops:.0f} M (n={len(acc)})"
    for space, budget, steps in keys:
        same = [r for r in rows if r["space"] == space and r["steps"] == steps]
        target = next(r["budget_bops"] for r in same if r["budget"] == budget)
        uni = {}
        for r in same:
            if r["method"].startswith("uniform-") and meets_budget(r["bops"], target):
                uni.setdefault(r["method"], []).append(r)
        best_u = max(uni.values(), key=lambda s: statistics.fmean(r["accuracy"] for r in s), default=[])
        at = [r for r in same if r["budget"] == budget]
        lines.append(f"| {space} | {budget} | {steps} | " + " | ".join(
            [cell([r for r in at if r["method"] == "fliqs"]),
             cell([r for r in at if r["method"].startswith("fliqs+ft")]),
             cell([r for r in at if r["method"] == "fliqs-config"]),
             (best_u[0]["method"][8:] + " " + cell(best_u)) if best_u else "none fits",
             cell([r for r in at if r["method"] == "ilp"]), cell([r for r in at if r["method"] == "random"])]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
