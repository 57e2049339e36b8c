"""Bad-input fuzzing through the CLI (click's CliRunner, in process).

Valid ONNX files are mutated (truncation, byte noise, wrong input/initializer dtypes, missing
initializers, dangling node inputs, shape and attribute corruption, huge dims, cycles, duplicate
names, an empty graph, opset 1/999, swapped/removed nodes) and run through ``fliqs inspect``
(a subset also through ``fliqs compile --steps 1 --target ort``); malformed data (.npz with wrong
keys/dtypes/shapes/NaN, truncated npz, empty or non-image folders) goes through ``fliqs compile``.
Every case is generated from a fixed seed, so the corpus is the same on every run.

Each case must exit 0, 1 or 2 within its time bound, print at most one line on stderr, never a
traceback, never an "internal error" (bad input is a FliqsError), and a failing model case names
the model file. Also: options that cost nothing to check are checked before the model is imported.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fliqs_compiler.driver.api import DEMO_MODEL

import onnx_models as M

SEED = 20260101
CASE_SECONDS = 30  # per-case bound (pytest-timeout): a hang fails instead of stalling the run
pytestmark = pytest.mark.usefixtures("no_debug_env")  # --debug sets FLIQS_DEBUG process-wide


# ---- base models -------------------------------------------------------------------------------
BASES = {
    "demo": lambda d: DEMO_MODEL,
    "tiny": lambda d: M.write_tiny(d / "tiny.onnx"),
    "tf_conv1d": lambda d: M.make_tf_conv1d(d, 13, "2d"),
    "paddle": M.make_paddle_pinned,
    "op_zoo": M.make_op_zoo,
    "pool_zoo": M.make_pool_zoo,
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_bases")
    cache = {}

    def get(name):
        if name not in cache:
            path = BASES[name](folder)
            cache[name] = (path.read_bytes(), onnx.load(str(path)))
        return cache[name]
    return get


# ---- model mutations: (rng, raw bytes, ModelProto copy) -> bytes -------------------------------
def _bytes(model) -> bytes:
    return model.SerializeToString()


def _pick(rng, seq):
    return seq[rng.randrange(len(seq))] if len(seq) else None


def m_truncate(rng, raw, m):
    return raw[:rng.randrange(1, len(raw))]


def m_noise(rng, raw, m):
    data = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def m_input_dtype(rng, raw, m):
    inp = _pick(rng, m.graph.input)
    inp.type.tensor_type.elem_type = _pick(rng, [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16,
                                                 17, 21, 22, 23, 26, 99])
    return _bytes(m)


def m_init_dtype(rng, raw, m):
    if not m.graph.initializer:
        return m_input_dtype(rng, raw, m)
    t = _pick(rng, m.graph.initializer)
    t.data_type = _pick(rng, [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 14, 16, 17, 21, 99])
    return _bytes(m)


def m_missing_init(rng, raw, m):
    if not m.graph.initializer:
        return m_dangling(rng, raw, m)
    del m.graph.initializer[rng.randrange(len(m.graph.initializer))]
    return _bytes(m)


def m_dangling(rng, raw, m):
    node = _pick(rng, [n for n in m.graph.node if n.input])
    node.input[rng.randrange(len(node.input))] = "no_such_tensor"
    return _bytes(m)


def m_input_shape(rng, raw, m):
    dims = _pick(rng, m.graph.input).type.tensor_type.shape.dim
    if len(dims):
        d = dims[rng.randrange(len(dims))]
        choice = rng.randrange(4)
        if choice == 0:
            d.dim_value = _pick(rng, [0, 2 ** 40, 2 ** 62, 3, 1000003])
        elif choice == 1:
            d.dim_param = _pick(rng, ["N", "?", "", "h"])
        elif choice == 2:
            dims.add().dim_value = 2
        else:
            del dims[len(dims) - 1]
    return _bytes(m)


def m_init_shape(rng, raw, m):
    if not m.graph.initializer:
        return m_input_shape(rng, raw, m)
    t = _pick(rng, m.graph.initializer)
    if t.dims and rng.random() < 0.5:
        t.dims[rng.randrange(len(t.dims))] = _pick(rng, [0, 2 ** 40, 7, 1])
    else:
        t.dims.append(_pick(rng, [2, 3, 2 ** 33]))
    return _bytes(m)


def m_huge_dims(rng, raw, m):
    """A shape constant asking for 2**40 elements (Reshape / Expand / ConstantOfShape)."""
    ints = [t for t in m.graph.initializer if t.data_type == TensorProto.INT64 and len(t.dims) == 1]
    if ints and rng.random() < 0.5:
        t = _pick(rng, ints)
        arr = numpy_helper.to_array(t).copy()
        if arr.size:
            arr[rng.randrange(arr.size)] = 2 ** 40
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
            return _bytes(m)
    m.graph.initializer.append(numpy_helper.from_array(np.array([2 ** 20, 2 ** 20, 4], np.int64),
                                                       "huge_shape"))
    op = _pick(rng, ["ConstantOfShape", "Expand", "Tile"])
    src = [] if op == "ConstantOfShape" else [m.graph.input[0].name]
    m.graph.node.append(helper.make_node(op, src + ["huge_shape"], ["huge"], name="huge_node"))
    m.graph.output.append(helper.make_tensor_value_info("huge", TensorProto.FLOAT, None))
    return _bytes(m)


_ATTR_VALUES = [0, -1, 2 ** 31, [0], [0, 0], [-1, -1, -1, -1], [1] * 7, [2 ** 40, 1], 1.5,
                "SAME_UPPER", "bogus", b"\xff\xfe"]


def m_attribute(rng, raw, m):
    nodes = [n for n in m.graph.node if n.attribute]
    if nodes and rng.random() < 0.7:
        node = _pick(rng, nodes)
        attr = _pick(rng, node.attribute)
        new = helper.make_attribute(attr.name, _pick(rng, _ATTR_VALUES))
        attr.CopyFrom(new)
    else:
        node = _pick(rng, m.graph.node)
        node.attribute.append(helper.make_attribute(
            _pick(rng, ["axis", "perm", "pads", "strides", "kernel_shape", "group", "to",
                        "auto_pad", "keepdims", "mode"]), _pick(rng, _ATTR_VALUES)))
    return _bytes(m)


def m_cycle(rng, raw, m):
    nodes = list(m.graph.node)
    late = nodes[rng.randrange(len(nodes) // 2, len(nodes))]
    early = nodes[rng.randrange(0, max(1, len(nodes) // 2))]
    if early.input:
        early.input[0] = late.output[0]
    else:
        early.input.append(late.output[0])
    return _bytes(m)


def m_duplicate(rng, raw, m):
    kind = rng.randrange(4)
    if kind == 0 and len(m.graph.node) > 1:  # two nodes write the same tensor
        a, b = rng.sample(range(len(m.graph.node)), 2)
        m.graph.node[b].output[0] = m.graph.node[a].output[0]
    elif kind == 1 and m.graph.initializer:
        m.graph.initializer.append(copy.deepcopy(_pick(rng, m.graph.initializer)))
    elif kind == 2:
        m.graph.input.append(copy.deepcopy(m.graph.input[0]))
    else:
        m.graph.output.append(copy.deepcopy(m.graph.output[0]))
    return _bytes(m)


def m_empty(rng, raw, m):
    kind = rng.randrange(3)
    del m.graph.node[:]
    if kind >= 1:
        del m.graph.output[:]
    if kind == 2:
        del m.graph.initializer[:]
        del m.graph.input[:]
    return _bytes(m)


def m_opset(rng, raw, m):
    kind = rng.randrange(5)
    if kind <= 1:
        for imp in m.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = 1 if kind == 0 else 999
    elif kind == 2:
        del m.opset_import[:]
    elif kind == 3:
        m.ir_version = _pick(rng, [0, 1, 99])
    else:
        m.opset_import.add(domain="", version=7)  # two default-domain imports
    return _bytes(m)


_OPS = ["Relu", "Conv", "Gemm", "MatMul", "Reshape", "Softmax", "Add", "Concat", "Gather",
        "Transpose", "Squeeze", "Unsqueeze", "Pad", "Resize", "Slice", "BatchNormalization",
        "MaxPool", "Flatten", "Cast", "Expand", "LayerNormalization", "Einsum", "NonZero", "Loop",
        "QuantizeLinear", "DequantizeLinear", "TopK", "Split", "ConvTranspose", "Range"]


def m_swap_op(rng, raw, m):
    node = _pick(rng, m.graph.node)
    node.op_type = _pick(rng, _OPS)
    return _bytes(m)


def m_remove_node(rng, raw, m):
    if len(m.graph.node) > 1:
        del m.graph.node[rng.randrange(len(m.graph.node))]
    return _bytes(m)


def m_external(rng, raw, m):
    """An initializer pointing at external data that is missing, outside, or too short."""
    if not m.graph.initializer:
        return m_dangling(rng, raw, m)
    t = _pick(rng, m.graph.initializer)
    t.ClearField("raw_data")
    for f in ("float_data", "int64_data", "int32_data", "double_data"):
        t.ClearField(f)
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=_pick(rng, ["missing.bin", "../../etc/hosts",
                                                           "/etc/passwd", "short.bin"]))
    t.external_data.add(key="length", value=str(_pick(rng, [4, 2 ** 40, 0])))
    return _bytes(m)


MUTATIONS = {
    "truncate": (m_truncate, 6), "noise": (m_noise, 3), "input-dtype": (m_input_dtype, 2),
    "init-dtype": (m_init_dtype, 2), "missing-init": (m_missing_init, 2),
    "dangling": (m_dangling, 2), "input-shape": (m_input_shape, 3), "init-shape": (m_init_shape, 2),
    "huge-dims": (m_huge_dims, 2), "attribute": (m_attribute, 5), "cycle": (m_cycle, 1),
    "duplicate": (m_duplicate, 2), "empty": (m_empty, 1), "opset": (m_opset, 2),
    "swap-op": (m_swap_op, 3), "remove-node": (m_remove_node, 2), "external": (m_external, 1),
}
# (case id, base, mutation, seed); a few cases also run `fliqs compile` (import-stage failures)
MODEL_CASES = [(f"{base}-{kind}-{i}", base, kind, SEED + 1000 * j + 17 * i)
               for j, base in enumerate(BASES) for kind, (_, n) in MUTATIONS.items()
               for i in range(n)]
COMPILE_KINDS = ("truncate", "dangling", "missing-init", "cycle", "empty")


def _lines(text: str) -> list:
    return [ln for ln in (text or "").splitlines() if ln.strip()]


def _check_outcome(code: int, stderr: str, stdout: str, name: str):
    lines = _lines(stderr)
    assert code in (0, 1, 2), f"exit {code}: {stderr!r}"
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    assert len(lines) <= 1, f"more than one line on stderr: {stderr!r}"
    if code != 0:
        assert lines and lines[0].startswith("fliqs: error: "), f"exit {code}: {stderr!r}"
        assert "internal error" not in lines[0], lines[0]
        assert name in lines[0], f"the error does not name {name!r}: {lines[0]!r}"


@pytest.mark.timeout(CASE_SECONDS)
@pytest.mark.parametrize("case_id,base,kind,seed", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_mutated_model(case_id, base, kind, seed, bases, tmp_path):
    raw, model = bases(base)
    rng = random.Random(seed)
    mutated = MUTATIONS[kind][0](rng, raw, copy.deepcopy(model))
    (tmp_path / "short.bin").write_bytes(b"\0\0")
    path = tmp_path / f"{case_id}.onnx"
    path.write_bytes(mutated)
    code, stderr, stdout = _run(["inspect", str(path), "--json"])
    _check_outcome(code, stderr, stdout, path.name)
    if kind in COMPILE_KINDS and seed % 2 == 0:
        code, stderr, stdout = _run(["compile", str(path), "--steps", "1", "--target", "ort",
                                     "--quiet", "--out", str(tmp_path / "out")])
        _check_outcome(code, stderr, stdout, path.name)


def _run(argv) -> tuple:
    """(exit code, stderr, stdout) of ``fliqs ARGV`` in process (test_bad_inputs._invoke, plus
    stdout); an exception escaping the CLI fails the case."""
    from click.testing import CliRunner

    from fliqs_compiler.cli.main import cli
    result = CliRunner().invoke(cli, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback
        raise AssertionError("uncaught exception: " + "".join(
            traceback.format_exception(result.exception)))
    return result.exit_code, result.stderr, result.stdout


# ---- malformed data through `fliqs compile` (the demo model takes 1x1x8x8 inputs) ---------------
def _npz_bytes(**arrays) -> bytes:
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _good_x(rng, n=12):
    return rng.standard_normal((n, 1, 8, 8)).astype(np.float32)


def d_keys(rng, d):
    return {"data.npz": _npz_bytes(**{_pick(rng, ["X", "inputs", "images", "arr_0"]): _good_x(rng)})}


def d_dtype(rng, d):
    kind = rng.randrange(5)
    x = _good_x(rng)
    x = [x.astype(np.complex64), np.array(["a"] * 12), np.array([None] * 12, dtype=object),
         np.array(["2020-01-01"] * 12, dtype="datetime64[D]"), np.array([b"x"] * 12)][kind]
    return {"data.npz": _npz_bytes(x=x)}


def d_shape(rng, d):
    shape = _pick(rng, [(12,), (12, 7), (12, 2, 8, 8), (12, 2, 3, 4, 5), (12, 0, 8), (), (1, 1, 8, 8),
                        (12, 5, 8, 8, 2)])
    return {"data.npz": _npz_bytes(x=rng.standard_normal(shape).astype(np.float32))}


def d_nan(rng, d):
    x = _good_x(rng)
    x.flat[rng.randrange(x.size)] = _pick(rng, [np.nan, np.inf, -np.inf])
    return {"data.npz": _npz_bytes(x=x)}


def d_labels(rng, d):
    x = _good_x(rng)
    y = _pick(rng, [np.arange(12) - 1, np.full(12, 10), np.arange(5), np.full(12, 0.5),
                    np.array(["a"] * 12), np.arange(12).reshape(3, 4)])
    return {"data.npz": _npz_bytes(x=x, y=y)}


def d_truncated(rng, d):
    raw = _npz_bytes(x=_good_x(rng), y=np.arange(12) % 10)
    return {"data.npz": raw[:rng.randrange(1, len(raw))]}


def d_not_npz(rng, d):
    return {"data.npz": _pick(rng, [b"", b"hello", bytes(range(256)) * 4, b"PK\x03\x04junk"])}


def d_one_sample(rng, d):
    return {"data.npz": _npz_bytes(x=_good_x(rng, 1))}


def d_empty_folder(rng, d):
    return {"images/": None, **({"images/sub/": None} if rng.random() < 0.5 else {})}


def d_non_images(rng, d):
    name = _pick(rng, ["a.png", "b.jpg", "c.txt", "cls/d.png"])
    return {f"images/{name}": _pick(rng, [b"not an image", b"\x89PNG\r\n\x1a\n\0\0", b""])}


DATA_MUTATIONS = {"keys": (d_keys, 2), "dtype": (d_dtype, 4), "shape": (d_shape, 4),
                  "nan": (d_nan, 2), "labels": (d_labels, 4), "truncated": (d_truncated, 4),
                  "not-npz": (d_not_npz, 3), "one-sample": (d_one_sample, 1),
                  "empty-folder": (d_empty_folder, 2), "non-images": (d_non_images, 3)}
DATA_CASES = [(f"data-{kind}-{i}", kind, SEED + 7919 * j + 31 * i)
              for j, (kind, (_, n)) in enumerate(DATA_MUTATIONS.items()) for i in range(n)]


@pytest.mark.timeout(CASE_SECONDS)
@pytest.mark.parametrize("case_id,kind,seed", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_malformed_data(case_id, kind, seed, tmp_path, demo_model):
    rng = np.random.default_rng(seed)
    files = DATA_MUTATIONS[kind][0](_RngAdapter(rng), tmp_path)
    for rel, content in files.items():
        target = tmp_path / rel
        if content is None:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    spec = tmp_path / ("data.npz" if "data.npz" in files else "images")
    code, stderr, stdout = _run(["compile", str(demo_model), "--data", str(spec), "--steps", "1",
                                 "--target", "ort", "--quiet", "--out", str(tmp_path / "out")])
    _check_outcome(code, stderr, stdout, spec.name)
    assert code == 2, f"malformed data accepted ({kind}): {stdout[-300:]!r}"


class _RngAdapter:
    """The random.Random calls the data mutators use, on one seeded numpy Generator."""

    def __init__(self, rng):
        self.rng = rng

    def randrange(self, a, b=None):
        return int(self.rng.integers(0, a) if b is None else self.rng.integers(a, b))

    def random(self):
        return float(self.rng.random())

    def standard_normal(self, shape):
        return self.rng.standard_normal(shape)


def test_corpus_size():
    assert len(MODEL_CASES) + len(DATA_CASES) >= 200


# ---- cheap options are checked before the model is imported -------------------------------------
CHEAP = [
    ("budget", ["--budget", "energy=3J"], "energy"),
    ("budget-value", ["--budget", "bops=-1x"], "--budget"),
    ("formats", ["--formats", "int8,int13"], "int13"),
    ("target", ["--target", "cuda-h100"], "cuda-h100"),
    ("data", ["--data", "mnist-please"], "mnist-please"),
    ("data-npz", ["--data", "{tmp}/none.npz"], "none.npz"),
    ("out", ["--out", "{tmp}/a_file/sub"], "--out"),
    ("steps", ["--steps", "0"], "--steps"),
    ("sweep", ["--sweep", "bops"], "--sweep"),
]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A valid model with 2**24 weights (64 MB): importing it would take visible time."""
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    w = numpy_helper.from_array(np.zeros((4096, 4096), np.float32), "w")
    onnx.save(helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])], [w]),
        opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize("name,args,word", CHEAP, ids=[c[0] for c in CHEAP])
def test_cheap_options_fail_before_import(name, args, word, big_model, tmp_path, monkeypatch):
    """The large model and one bad cheap option: one line, exit 2, and the importer was never
    called (it raises here if it is)."""
    import fliqs_compiler.frontends.onnx_import as onnx_import

    def never(*a, **k):
        raise AssertionError("the model was imported before the options were checked")
    monkeypatch.setattr(onnx_import, "import_onnx", never)
    (tmp_path / "a_file").write_text("x")
    argv = ["compile", str(big_model), "--target", "ort", "--steps", "1", "--quiet",
            "--out", str(tmp_path / "out")]
    argv += [a.format(tmp=tmp_path) for a in args]
    code, stderr, stdout = _run(argv)
    lines = _lines(stderr)
    assert code == 2 and len(lines) == 1 and word in lines[0], stderr
    assert "imported before" not in stderr
