"""The whole pipeline (``analyze`` / ``prepare``): option validation, and every pass's ensures on
the real graphs it produces."""
from __future__ import annotations

import pytest

from fliqs_compiler import passes as P
from fliqs_compiler.base.errors import FliqsError


def test_bad_options_are_fliqs_errors(cnn):
    _, g = cnn
    with pytest.raises(FliqsError, match="unknown format 'int33'"):
        P.prepare(g, P.PrepareOptions(formats=["int33"]))
    with pytest.raises(FliqsError, match="bn option"):
        P.prepare(g, P.PrepareOptions(bn="nope"))


@pytest.mark.parametrize("bn", ["fold", "qat"])
def test_every_ensures_holds_at_the_end(cnn, bn):
    """Each pass's ensures hold after the pass (run_passes checks it); the ones no later pass
    undoes still hold on the final graph."""
    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(bn=bn, formats=["int8"]))
    steps = P.pipeline(P.PrepareOptions(bn=bn))
    for step in steps:
        for condition in step.ensures:
            assert condition(p) is None, (step.__name__, condition.__name__, condition(p))
    assert list(p.meta["pass_times"]) == [step.__name__ for step in steps] == [
        "functionalize_modules", "propagate_shapes",
        "fold_batchnorm" if bn == "fold" else "fold_batchnorm_qat", "propagate_shapes_after_bn",
        "annotate_fusion", "discover_quantizable", "group_decisions", "annotate_costs",
        "insert_quantizers"]
