"""SearchableQuantizer: one scale per candidate (switchable), data-initialised, LSQ-learned;
FormatQuantizer: fixed, export-friendly."""
import torch

import fliqs_compiler as fq
from fliqs_compiler.numerics.quantizers import FormatQuantizer, SearchableQuantizer, executed_format


def test_each_candidate_owns_its_scale():
    torch.manual_seed(0)
    q = SearchableQuantizer(["int4", "int8", "fp8_e4m3"], "weight", channels=4, axis=0,
                            block_axis=1)
    w = torch.randn(4, 32)
    outs = []
    for i in range(3):
        q.active = i
        outs.append(q(w))
    assert bool(q.initialized.all())
    s4, s8 = q.scales[0].detach(), q.scales[1].detach()
    assert not torch.allclose(s4, s8)  # int4 and int8 calibrated separately
    # switching back does not disturb the other candidates' scales
    q.active = 0
    assert torch.equal(q(w), outs[0])
    assert torch.equal(q.scales[1].detach(), s8)


def test_int8_weight_quantizer_matches_fake_quant_with_its_scale():
    q = SearchableQuantizer(["int8"], "weight", channels=3, axis=0, block_axis=1)
    w = torch.randn(3, 20)
    y = q(w)
    ref = fq.fake_quant(w, "int8", q.scales[0].detach(), axis=0)
    assert torch.equal(y, ref)
    assert (y - w).abs().max() <= q.scales[0].max() / 2 + 1e-6


def test_unsigned_activation_runs_uint():
    q = SearchableQuantizer(["int4", "fp8_e4m3"], "activation", unsigned=True)
    assert q.executed(0) == "uint4" and q.executed(1) == "fp8_e4m3"
    x = torch.rand(100) * 3
    y = q(x)
    assert len(torch.unique(y)) <= 16 and (y >= 0).all()
    fixed = q.to_fixed()
    assert fixed.fmt == "uint4" and fixed.searched_format == "int4"
    assert fixed.zero_point is not None and torch.equal(fixed(x), y)
    assert executed_format("int8", True) == "uint8" and executed_format("int3", False) == "int3"


def test_scales_learn_and_gradients_reach_weights():
    torch.manual_seed(0)
    q = SearchableQuantizer(["int3"], "activation")
    x = torch.randn(512) * 2
    x.requires_grad_(True)
    q(x.detach())  # initialise (MSE-optimal already)
    best = q.scales[0].detach().clone()
    with torch.no_grad():  # start 3x too wide: learning must bring it back
        q.log_scales[0].add_(torch.log(torch.tensor(3.0)))
    opt = torch.optim.Adam(q.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss = (q(x) - x).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    ratio = float(q.scales[0].detach() / best)
    assert 0.7 < ratio < 1.6  # back near the MSE-optimal scale (started at 3x)
    assert x.grad is not None and (x.grad != 0).any()


def test_activation_scales_start_mse_optimal_for_every_width():
    from fliqs_compiler.numerics.quant import mse_scale
    torch.manual_seed(0)
    x = torch.randn(4096).relu() ** 1.5  # heavy-tailed, non-negative, like a post-ReLU activation
    q = SearchableQuantizer(["int2", "int3", "int4", "int8"], "activation", unsigned=True)
    for i in range(4):
        q.active = i
        q(x)
        expected = mse_scale(x, q.executed(i), None)
        assert torch.allclose(q.scales[i].detach(), expected, rtol=1e-5)
    # low widths clip much harder than absmax would
    assert float(q.scales[0]) < 0.6 * float(x.max()) / 3


def test_mx_and_float_candidates_have_no_learned_scale():
    q = SearchableQuantizer(["mxfp4_e2m1", "float"], "weight", channels=2, axis=0, block_axis=1)
    assert not q.scales[0].requires_grad and not q.scales[1].requires_grad
    w = torch.randn(2, 64)
    assert torch.equal(q(w), fq.fake_quant(w, "mxfp4_e2m1", 1.0, axis=1))
    q.active = 1
    assert q(w) is w
    fixed = q.to_fixed(0)
    assert fixed.fmt == "mxfp4_e2m1" and torch.equal(fixed(w), fq.fake_quant(w, "mxfp4_e2m1", 1.0, 1))


def test_format_quantizer_exports_as_one_node():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = FormatQuantizer("fp8_e5m2", torch.tensor([0.1]))

        def forward(self, x):
            return self.q(x) + 1

    ep = torch.export.export(M(), (torch.randn(4),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fliqs.fake_quant.default) == 1


def test_loaded_state_keeps_scales_initialised():
    """Resume: a quantizer loaded from a state dict must not re-initialise its scales from the
    next batch (``forward`` reads a host copy of ``initialized``, refreshed at load)."""
    torch.manual_seed(0)
    q = SearchableQuantizer(["int4", "int8"], "activation")
    q(torch.randn(64) * 2)  # calibrates int4 only
    with torch.no_grad():
        q.log_scales[0].add_(0.5)  # a learned value the data would not give
    state = q.state_dict()
    fresh = SearchableQuantizer(["int4", "int8"], "activation")
    fresh.load_state_dict(state)
    fresh(torch.randn(64) * 10)  # a very different batch
    assert torch.equal(fresh.log_scales[0].detach(), state["log_scales.0"])
    assert bool(fresh.initialized[0]) and not bool(fresh.initialized[1])
    fresh.active = 1
    fresh(torch.randn(64))  # the uncalibrated candidate still initialises on first use
    assert bool(fresh.initialized[1])
