"""Budget parsing, resolution against a graph (relative = fraction of all-INT8), impossible budgets."""
import pytest
import torch

from fliqs_compiler.cost.budget import (cheapest_config, parse_budget, reference_cost, resolve_budget)
from fliqs_compiler.base.errors import FliqsError
from examples.toy_models import TinyCNN, make_searchable


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    return make_searchable(TinyCNN(), torch.randn(1, 1, 8, 8), ["int4", "int8", "fp8_e4m3"])


# MACs of TinyCNN at 1x1x8x8: conv1 8*8*8*9 = 4608, conv2 16*4*4*72 = 18432, fc 10*256 = 2560
MACS = 4608 + 18432 + 2560
PARAMS = 80 + 1168 + 2570


@pytest.mark.parametrize("text,kind,value,relative", [
    ("bops=0.25x", "bops", 0.25, True),
    ("bops=12.5G", "bops", 12.5e9, False),
    ("BOPS=3M", "bops", 3e6, False),
    ("bops=1e6", "bops", 1e6, False),
    ("size=2MB", "size", 2e6, False),
    ("size=1.5KiB", "size", 1536.0, False),
    ("size=0.5x", "size", 0.5, True),
    ("latency=3ms", "latency", 3.0, False),
    ("latency=250us", "latency", 0.25, False),
])
def test_parse(text, kind, value, relative):
    b = parse_budget(text)
    assert (b.kind, b.relative) == (kind, relative)
    assert b.value == pytest.approx(value)


@pytest.mark.parametrize("text,needle", [
    ("flops=1G", "unknown budget kind 'flops'"),
    ("bops", "unknown budget kind"),
    ("bops=abc", "cannot read the value"),
    ("size=2parsecs", "cannot read the value"),
    ("latency=3MB", "cannot read the value"),
    ("bops=0x", "positive"),
])
def test_parse_errors(text, needle):
    with pytest.raises(FliqsError) as e:
        parse_budget(text)
    assert needle in str(e.value) and "--budget" in str(e.value) and "\n" not in str(e.value)


def test_resolve_relative_and_absolute(graph):
    assert reference_cost(graph, "bops") == MACS * 64
    assert resolve_budget("bops=0.5x", graph) == pytest.approx(0.5 * MACS * 64)
    assert resolve_budget("bops=1.2M", graph) == pytest.approx(1.2e6)
    assert reference_cost(graph, "size") == pytest.approx(PARAMS)  # int8 weights: 1 byte each
    assert resolve_budget("size=0.75x", graph) == pytest.approx(0.75 * PARAMS)


def test_impossible_budget_names_cheapest(graph):
    cost, choice = cheapest_config(graph, "bops")
    assert cost == MACS * 16  # every layer int4
    assert resolve_budget("bops=0.25x", graph) == pytest.approx(cost)  # exactly reachable: accepted
    with pytest.raises(FliqsError) as e:
        resolve_budget("bops=0.2x", graph)
    msg = str(e.value)
    assert "impossible" in msg and "409.6 kBOPs" in msg and "0.25x" in msg and "int4" in msg


class Table:
    """A fake measured latency table: 1 µs per 1000 MACs per 8 bits of weight."""

    def layer_ms(self, layer, fmt_w, fmt_a):
        from fliqs_compiler.numerics import formats as F
        return layer.macs / 1e6 * F.get(fmt_w).bits / 8


def test_latency_budget(graph):
    with pytest.raises(FliqsError, match="latency table"):
        resolve_budget("latency=1ms", graph)
    assert resolve_budget("latency=0.02ms", graph, Table()) == pytest.approx(0.02)
    assert resolve_budget("latency=0.8x", graph, Table()) == pytest.approx(0.8 * MACS / 1e6)
    with pytest.raises(FliqsError, match="impossible"):
        resolve_budget("latency=1us", graph, Table())


def test_graph_without_space():
    g = make_searchable(TinyCNN(), torch.randn(1, 1, 8, 8), ["int8"], keep_float=("conv1", "conv2", "fc"))
    with pytest.raises(FliqsError, match="no search space"):
        resolve_budget("bops=0.5x", g)
