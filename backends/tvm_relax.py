"""Relax IR utilities the TVM passes share: find the calls of an operator, rewrite calls."""
from __future__ import annotations

__all__ = ["calls", "rewrite_calls"]


def calls(func, op_name: str) -> list:
    """The calls of the Relax operator ``op_name`` in ``func``."""
    from tvm import relax
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", None) == op_name:
            found.append(e)
    relax.analysis.post_order_visit(func.body, visit)
    return found


def rewrite_calls(mod, rewrite):
    """``mod`` with every call in its Relax functions replaced by ``rewrite(builder, call)`` where
    that returns an expression (None keeps the call); inner calls are rewritten first."""
    from tvm import relax
    from tvm.relax import expr_functor

    @expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            new = rewrite(self.builder_, call)
            return call if new is None else new

    mutator = _Rewrite(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
