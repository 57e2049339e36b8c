"""Quantizer modules that passes insert into graphs.

- ``FormatQuantizer``: one fixed format with its scale (what ``materialize`` leaves behind and
  what exporters / lowerings read: ``fmt``, ``scale``, ``zero_point``, ``axis``).
- ``SearchableQuantizer``: several candidate formats, one active at a time (``.active``), each
  candidate owning its own scale ("switchable" scales, method.md), so switching formats does
  not fight over one clip value. The search sets ``.active`` every step.

Scales are initialised from data the first time a candidate runs — MSE-optimal clipping for
weights AND activations, per format (measured: absmax-initialised INT2/INT3 activation scales
start 2–3.3× the MSE-optimal value and never recover; uniform INT4 on a frozen float ResNet-8
was 67.8 % with absmax, 87.2 % with MSE init) — and then learned (``scale_mode='learned'``) or
kept (``'calibrated'``). A learned scale is stored as its logarithm (``log_scales``): Adam's
step is then a relative change of the scale, the same for an INT8 weight scale of 1e-3 and an
INT2 activation scale of 1 (with the scale itself as the parameter, Adam moved every scale by
≈ lr per step whatever its size). MX and float candidates have no scale to learn (MX blocks
carry their own power-of-two scales).

Activations known to be non-negative (``unsigned=True``, set by the fusion pass after a ReLU)
execute an ``intN`` candidate as ``uintN`` with zero point 0: same bits, twice the levels, and
what a u8 × s8 VNNI kernel wants.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from fliqs_compiler.numerics import formats as F
from fliqs_compiler.numerics.quant import fake_quant, lsq_grad_factor, mse_scale, scale_grad

__all__ = ["FormatQuantizer", "SearchableQuantizer", "executed_format", "init_rows_from"]

# While a data-parallel rank runs its share of a batch (``search.parallel``), the rows an
# activation scale is initialised from: every rank's share gathered, so the scale is the one a
# single process would compute on the whole batch (and equal on every rank).
_INIT_ROWS: Optional[Callable] = None


@contextlib.contextmanager
def init_rows_from(gather: Callable):
    """Activation scales initialised in the body see ``gather(x)`` instead of ``x``."""
    global _INIT_ROWS
    previous, _INIT_ROWS = _INIT_ROWS, gather
    try:
        yield
    finally:
        _INIT_ROWS = previous


def executed_format(fmt_name: str, unsigned: bool) -> str:
    """The format a quantizer really runs: ``intN`` on a non-negative tensor runs as ``uintN``."""
    fmt = F.get(fmt_name)
    if unsigned and fmt.has_integer_levels and fmt.signed and f"uint{fmt.bits}" in F.names():
        return f"uint{fmt.bits}"
    return fmt.name


def _has_scale(fmt: F.Format) -> bool:
    return fmt.has_scale


class FormatQuantizer(nn.Module):
    """Quantize-dequantize in one fixed format.

    Attributes read by exporters and lowerings: ``fmt`` (executed format name), ``scale``
    (tensor, [1] or per-channel [C]), ``zero_point`` (tensor or None), ``axis`` (channel axis of
    ``scale`` or MX block axis, or None), ``role`` ('weight' | 'activation'), ``searched_format``
    (the name the config uses, e.g. ``int8`` where ``fmt`` is ``uint8``).
    """

    def __init__(self, fmt: str, scale: torch.Tensor, axis: Optional[int] = None,
                 zero_point: Optional[torch.Tensor] = None, role: str = "activation",
                 block_axis: Optional[int] = None, searched_format: Optional[str] = None):
        super().__init__()
        self.fmt = F.get(fmt).name
        self.searched_format = searched_format or self.fmt
        self.role = role
        self.axis = axis
        self.block_axis = block_axis
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        if zero_point is not None:
            self.register_buffer("zero_point", zero_point.detach().to(torch.float32).clone())
        else:
            self.zero_point = None

    def quant_axis(self) -> Optional[int]:
        return self.block_axis if F.get(self.fmt).is_blocked else self.axis

    def forward(self, x):
        if self.fmt == "float":
            return x
        return fake_quant(x, self.fmt, self.scale, self.quant_axis(), self.zero_point)

    def extra_repr(self):
        return f"fmt={self.fmt}, role={self.role}, axis={self.axis}, scale={tuple(self.scale.shape)}"


class SearchableQuantizer(nn.Module):
    """Quantize-dequantize in the active one of several candidate formats.

    Args:
        candidates: format names searched for this tensor (``float`` allowed).
        role: 'weight' or 'activation'.
        channels: number of per-channel scales (weights: output channels) or None (per tensor).
        axis: channel axis of per-channel scales (weights: 0).
        block_axis: MX block axis (the reduction axis: 1 for conv/linear weights and NCHW
            activations, -1 for the last dim of a linear input).
        unsigned: the tensor is known to be non-negative (see ``executed_format``).
        scale_mode: 'learned' (LSQ) or 'calibrated' (fixed after the first batch).
    """

    def __init__(self, candidates: Sequence[str], role: str, channels: Optional[int] = None,
                 axis: Optional[int] = None, block_axis: Optional[int] = None,
                 unsigned: bool = False, scale_mode: str = "learned"):
        super().__init__()
        if role not in ("weight", "activation"):
            raise ValueError(f"role must be 'weight' or 'activation', not {role!r}")
        self.candidates = tuple(F.get(c).name for c in candidates)
        self.role = role
        self.channels = channels
        self.axis = axis if channels else None
        self.block_axis = block_axis
        self.unsigned = unsigned
        self.scale_mode = scale_mode
        self.active = 0
        n = channels or 1
        self.log_scales = nn.ParameterList(
            [nn.Parameter(torch.zeros(n), requires_grad=(scale_mode == "learned"
                                                          and _has_scale(F.get(self.executed(i)))))
             for i in range(len(self.candidates))])
        self.register_buffer("initialized", torch.zeros(len(self.candidates), dtype=torch.bool))
        # a host mirror of ``initialized``: reading the buffer in ``forward`` would be one
        # device→host sync per quantizer per step on CUDA
        self._host_initialized = [False] * len(self.candidates)

    def executed(self, index: Optional[int] = None) -> str:
        """Executed format name of candidate ``index`` (default: the active one)."""
        return executed_format(self.candidates[self.active if index is None else index],
                               self.unsigned)

    @property
    def scales(self) -> list:
        """Each candidate's scale (``exp`` of its learned logarithm; differentiable)."""
        return [ls.exp() for ls in self.log_scales]

    def set_format(self, name: str) -> None:
        self.active = self.candidates.index(F.get(name).name)

    @torch.no_grad()
    def _init_scale(self, x: torch.Tensor, index: int) -> None:
        fmt = F.get(self.executed(index))
        if _has_scale(fmt):
            if _INIT_ROWS is not None and self.role == "activation":
                x = _INIT_ROWS(x)
            s = mse_scale(x, fmt, self.axis)
            target = self.log_scales[index]
            target.copy_(s.clamp_min(1e-12).log().reshape(target.shape))
        self.initialized[index] = True
        self._host_initialized[index] = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_initialized = [bool(v) for v in self.initialized.tolist()]  # once, at load

    def forward(self, x):
        index = self.active
        fmt = F.get(self.executed(index))
        if not fmt.is_quantized:
            return x
        if not _has_scale(fmt):  # MX: the blocks carry their own power-of-two scales
            return fake_quant(x, fmt, 1.0, self.block_axis)
        if not self._host_initialized[index]:
            self._init_scale(x, index)
        scale = self.log_scales[index].exp()
        if scale.requires_grad:
            per = x.numel() // scale.numel()
            scale = scale_grad(scale, lsq_grad_factor(per, fmt))
        return fake_quant(x, fmt, scale, self.axis)

    def to_fixed(self, index: Optional[int] = None) -> FormatQuantizer:
        """The fixed quantizer for candidate ``index`` (default: active), scale copied."""
        index = self.active if index is None else index
        fmt = self.executed(index)
        scale = self.log_scales[index].detach().exp()  # the very value forward() used
        if not _has_scale(F.get(fmt)):
            scale = torch.ones(1)
        zp = torch.zeros_like(scale) if F.get(fmt).uses_zero_point else None
        return FormatQuantizer(fmt, scale, axis=self.axis, zero_point=zp, role=self.role,
                               block_axis=self.block_axis, searched_format=self.candidates[index])

    def extra_repr(self):
        return (f"role={self.role}, candidates={self.candidates}, active={self.active}, "
                f"unsigned={self.unsigned}")
