"""config.json: read, validate, write (atomically).

Schema (docs/design.md, "config.json"): ``{"model": str, "formats": {"<node name>": {"weight": fmt,
"activation": fmt}}}`` plus optional extra keys. A node absent from ``formats`` stays float;
``"float"`` may be written explicitly. A missing ``activation`` defaults to the ``weight``
format (as the cost model reads it). Format names are normalised to registry names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fliqs_compiler.numerics import formats as F
from fliqs_compiler.base import atomic
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.space import ROLES, roles_of

__all__ = ["load_config", "save_config", "validate_formats", "ROLES"]

def _fmt(source: str, node: str, role: str, value) -> str:
    try:
        return F.get(value).name
    except (KeyError, TypeError):
        raise FliqsError(f"{source}: node {node!r} {role}: unknown format {value!r}; known: "
                         f"{', '.join(F.searchable_names())}") from None


def validate_formats(formats: dict, graph=None, source: str = "config") -> dict:
    """Normalise a ``{node: {"weight", "activation"}}`` mapping and check it.

    Without a graph: shape and format names. With a ``Graph``: an input-only layer's weight is
    ``"float"`` (it has none); every node must be one of its
    quantizable layers; a non-float format needs a searched (not kept-float) layer and, once
    quantizers are inserted, a format among that quantizer's candidates. Violations raise one
    FliqsError naming the file, node and what to do.
    """
    if not isinstance(formats, dict):
        raise FliqsError(f"{source}: 'formats' must be an object {{node: {{\"weight\": fmt, "
                         f"\"activation\": fmt}}}}")
    out = {}
    for node, entry in formats.items():
        if not isinstance(entry, dict) or not entry or set(entry) - set(ROLES):
            raise FliqsError(f"{source}: node {node!r}: expected {{\"weight\": fmt, "
                             f"\"activation\": fmt}}, got {json.dumps(entry)[:80]}")
        w = _fmt(source, node, "weight", entry.get("weight", entry.get("activation")))
        a = _fmt(source, node, "activation", entry.get("activation", w))
        out[node] = {"weight": w, "activation": a}
    if graph is not None:
        unknown = [n for n in out if n not in graph.layers]
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:5])
            more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise FliqsError(f"{source}: unknown node(s) {shown}{more} for model "
                             f"{graph.name!r}; `fliqs inspect MODEL` lists the node names")
        space = graph.space
        for node, entry in out.items():
            layer = graph.layers[node]
            if "weight" not in roles_of(layer):  # an input-only layer has no weight
                entry["weight"] = "float"
            for role in ROLES:
                fmt = entry[role]
                if fmt == "float":
                    continue
                if layer.keep_float:
                    raise FliqsError(f"{source}: node {node!r} is kept in float by the keep-float "
                                     f"rules; set its formats to \"float\" or drop it")
                path = space.quantizers.get((node, role)) if space is not None else None
                if path is not None:
                    cands = getattr(graph.gm.get_submodule(path), "candidates", None)
                    if cands is not None and fmt not in cands:
                        raise FliqsError(f"{source}: node {node!r} {role}: format {fmt!r} was not "
                                         f"searched; choose one of {', '.join(cands)}")
    return out


def load_config(path, graph=None) -> dict:
    """Read config.json. Returns the whole object with ``formats`` normalised (see
    ``validate_formats``; with ``graph`` the node names are checked against it)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FliqsError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FliqsError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(data, dict) or "formats" not in data:
        raise FliqsError(f"{path}: expected {{\"model\": ..., \"formats\": {{...}}}}")
    data["formats"] = validate_formats(data["formats"], graph, source=str(path))
    data.setdefault("model", graph.name if graph is not None else "")
    return data


def save_config(path, model: str, formats: dict, extra: Optional[dict] = None) -> Path:
    """Write config.json atomically (temp file + ``os.replace``); returns the path."""
    path = Path(path)
    data = {"model": model, "formats": validate_formats(formats, None, source=str(path))}
    for k, v in (extra or {}).items():
        if k not in data:
            data[k] = v
    atomic.write_text(path, json.dumps(data, indent=2) + "\n")
    return path
