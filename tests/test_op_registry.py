"""The op registry (bfpaccel.runtime.ops): one declaration per op drives the compiler's
SUPPORTED_OPS, the plan validator's schema, constant folding and lowering."""

from __future__ import annotations

import numpy as np
import pytest

import bfpaccel
from bfpaccel.runtime import SUPPORTED_OPS, ops
from bfpaccel.runtime import _validate
from bfpaccel.runtime.fold import fold_node
from bfpaccel.runtime.graph import Node
from bfpaccel.runtime.ops import _registry


def test_supported_ops_is_the_registry():
    assert SUPPORTED_OPS == set(ops.all_specs())
    for name, spec in ops.all_specs().items():
        assert spec.op_type == name
        # every op runs somewhere: lowered, folded on constants, or compiled into one that is
        assert spec.lower is not None or spec.fold is not None or spec.weights == _registry.TO_DENSE, name
        assert spec.family.startswith("bfpaccel.runtime.ops."), (name, spec.family)
        lo, hi = spec.inputs
        assert lo >= 0 and (hi is None or hi >= lo), name


def test_matrix_ops_declare_their_weights():
    assert {n for n, s in ops.all_specs().items() if s.weights == _registry.QUANTIZED} == {"Conv", "BfpDense"}
    assert {n for n, s in ops.all_specs().items() if s.weights == _registry.TO_DENSE} == {"Gemm", "MatMul"}
    assert not ops.find("Conv").fold_constants and not ops.find("Shape").fold_constants
    assert ops.find("Relu").fold_constants


def test_registering_an_op_twice_is_an_error():
    with pytest.raises(ValueError, match="second lowering"):
        ops.lowers("Relu")(lambda cx, n: None)
    with pytest.raises(ValueError, match="second folder"):
        ops.folds("Add")(lambda n, a, opset: [a[0]])
    with pytest.raises(ValueError, match="schema declared twice"):
        ops.declare("Softmax", inputs=1)
    with pytest.raises(TypeError, match="unknown op schema keys"):
        ops.declare("NotAnOp_" + "x" * 3, input=1)
    _registry._SPECS.pop("NotAnOp_xxx", None)


def test_folders_follow_numpy():
    x = np.arange(12, dtype=np.int64).reshape(3, 4)
    (y,) = fold_node(Node("Transpose", "t", ["x"], ["y"], {"perm": [1, 0]}), [x], 13)
    np.testing.assert_array_equal(y, x.T)
    (m,) = fold_node(Node("Max", "m", ["a", "b", "c"], ["m"]), [x, x[::-1], np.int64(5)], 13)
    np.testing.assert_array_equal(m, np.maximum(np.maximum(x, x[::-1]), 5))
    with pytest.raises(NotImplementedError, match="Softmax"):
        fold_node(Node("Softmax", "s", ["x"], ["y"]), [x], 13)
    with pytest.raises(NotImplementedError):
        fold_node(Node("NoSuchOp", "s", ["x"], ["y"]), [x], 13)


def test_plan_schema_comes_from_the_registry():
    """The validator checks a node's arity and attributes with its op's declaration."""
    def manifest(node):
        return {"bfpaccel_plan": 1, "format": {"name": "fp32"}, "weight_format": {"name": "fp32"},
                "vector_precision": "fp32", "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": None}], "nodes": [node], "consts": {}}

    ok = {"op": "LeakyRelu", "name": "l", "inputs": ["x"], "outputs": ["y"], "attrs": {"alpha": 0.2}}
    assert _validate.check_manifest(manifest(ok)).nodes[0].op == "LeakyRelu"
    with pytest.raises(_validate._Bad, match="takes 1 inputs"):
        _validate.check_manifest(manifest(dict(ok, inputs=["x", "x"])))
    with pytest.raises(_validate._Bad, match="alpha"):
        _validate.check_manifest(manifest(dict(ok, attrs={"alpha": "big"})))
    with pytest.raises(_validate._Bad, match="not one this runtime executes"):
        _validate.check_manifest(manifest(dict(ok, op="LpNormalization")))


def test_an_op_without_a_lowering_is_named_on_computed_inputs():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Range", ["x", "x", "x"], ["y"])], "t",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_empty_tensor_value_info("y")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    plan = bfpaccel.compile(m, format="fp32")
    with pytest.raises(bfpaccel.runtime.LoweringError, match="Range is not supported on a computed"):
        bfpaccel.Session(plan).run(None, {"x": np.ones(1, np.float32)})


def test_core_enums_name_the_onnx_ops():
    """Python takes every op number from the core (_core.OpKind, UnaryKind, ...), by name."""
    from bfpaccel import _core
    from bfpaccel.runtime.lower import op_kind_name
    from bfpaccel.runtime.ops._common import core_kind

    for op, name in [("Relu", "RELU"), ("LeakyRelu", "LEAKY_RELU"), ("HardSigmoid", "HARD_SIGMOID"),
                     ("HardSwish", "HARD_SWISH"), ("Reciprocal", "RECIPROCAL"), ("Erf", "ERF")]:
        assert core_kind(_core.UnaryKind, op) == getattr(_core.UnaryKind, name)
        assert op_kind_name(_core.OpKind.UNARY, core_kind(_core.UnaryKind, op)) == op.lower()
    for op in ("Sum", "Mean", "Max", "Min", "SumSquare", "L2"):
        assert op_kind_name(_core.OpKind.REDUCE, core_kind(_core.ReduceKind, op)) == "reduce " + op.lower()
    assert [op_kind_name(_core.OpKind.POOL, k) for k in (_core.PoolKind.MAX, _core.PoolKind.AVERAGE)] == \
        ["max pool", "average pool"]
    names = {op_kind_name(k) for k in _core.OpKind.__members__.values()}
    assert len(names) == len(_core.OpKind.__members__) and not any(n.startswith("kind ") for n in names)
    with pytest.raises(AttributeError):
        core_kind(_core.UnaryKind, "NoSuchFunction")
