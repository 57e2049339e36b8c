"""Train the bundled demo model: a small CNN on sklearn digits (input 1x1x8x8, ~98 % held-out
accuracy), exported as ONNX (< 1 MB) to ``fliqs_compiler/assets/demo.onnx``.

Run: ``.venv/bin/python examples/make_demo_model.py [--out PATH] [--epochs N] [--seed S]``.
Deterministic under the seed (2 threads). The preprocessing is the one ``fliqs`` applies to the
``digits`` data spec (``fliqs_compiler.data.sources.load_data``) so the float model's accuracy inside
``fliqs compile --data digits`` is the accuracy printed here.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

ASSET = Path(__file__).resolve().parents[1] / "fliqs_compiler" / "assets" / "demo.onnx"


class DigitsCNN(nn.Module):
    """Five 3×3 conv+BN+ReLU (16, 32, 32 | maxpool | 64, 64 channels) → GAP → fc(64→10): six
    quantizable layers, four of them searched under the default keep-first/last-float rules."""

    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(
            *block(1, 16), *block(16, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.features(x))


def digits_arrays(seed: int):
    """(x_train, y_train, x_val, y_val) preprocessed exactly as ``fliqs`` does for ``digits``."""
    try:
        from fliqs_compiler.data.sources import load_data
        from fliqs_compiler.ir.graph import InputSpec
        ds = load_data("digits", InputSpec("input", (1, 1, 8, 8)), holdout=0.2, seed=seed)
        return (torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train),
                torch.as_tensor(ds.x_val), torch.as_tensor(ds.y_val))
    except (ImportError, AttributeError):  # data module not available: same default scaling
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        n_val = int(round(0.2 * len(x)))
        val, tr = perm[:n_val], perm[n_val:]
        return x[tr], y[tr], x[val], y[val]


def train(epochs: int = 30, seed: int = 0):
    """Train the CNN; returns (model in eval mode, held-out accuracy)."""
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    x_tr, y_tr, x_val, y_val = digits_arrays(seed)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * ((len(x_tr) + 63) // 64))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(x_tr), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx].long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_val).argmax(1) == y_val.long()).float().mean().item()
    return model, acc


def export(model: nn.Module, path: Path) -> Path:
    """Export to ONNX (legacy exporter, opset 17, BN folded, input 'input' 1x1x8x8, output 'logits'),
    check it, and write it atomically."""
    import onnx
    from fliqs_compiler.base import atomic
    path = Path(path)
    with atomic.replacing(path, suffix=".onnx") as tmp:
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), tmp, input_names=["input"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          do_constant_folding=True)
        onnx.checker.check_model(onnx.load(tmp))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSET)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, acc = train(args.epochs, args.seed)
    path = export(model, args.out)
    print(f"held-out accuracy {acc * 100:.2f} % ; wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
