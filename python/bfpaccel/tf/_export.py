"""From a graph with BFP ops back to the float graph that ``bfpaccel.compile`` reads.

A BFP op is a ``PyFunc`` node (``tf.numpy_function``): tf2onnx cannot convert it, and its
Python function exists only in the process that built the graph. Each one carries
``_bfpaccel_*`` attributes (see :mod:`bfpaccel.tf._ops`); :func:`float_graph_def` rewrites it
into the float TensorFlow op whose compiled plan computes the same numbers:

* ``conv2d`` / ``matmul`` -> ``Conv2D`` / ``MatMul`` (+ ``BiasAdd``, ``AddV2`` of the residual,
  ``Relu``) with the weights and bias as constants -- the plan quantizes exactly these values
  and fuses the rest into the same epilogue;
* ``fold_batch_norm`` (weights only) -> evaluated here with the same float64 arithmetic;
* vector ops -> their float op (``round`` -> ``Identity``, ``add`` -> ``AddV2``,
  ``spatial_mean`` -> ``Mean``, ``avg_pool`` -> ``AvgPool``, ``softmax`` -> ``Softmax``,
  ``batch_norm`` -> ``FusedBatchNormV3``, ``l2_normalize`` -> Square/Sum/Maximum/Rsqrt/Mul,
  as ``x * (rsqrt * gamma)``, the order TF's graph optimiser gives the float graph);
* the ``IdentityN`` nodes of ``tf.custom_gradient`` -> one ``Identity`` per output.

Constants are read with the graph's session (variables) or computed (folds).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _numerics as nm

__all__ = ["float_graph_def", "has_bfp_ops", "bfp_op_kinds"]

ATTR_PREFIX = "_bfpaccel_"
_PYFUNC_OPS = ("PyFunc", "PyFuncStateless")


def _is_bfp(node: Any) -> bool:
    return node.op in _PYFUNC_OPS and (ATTR_PREFIX + "op") in node.attr


def has_bfp_ops(graph_def: Any) -> bool:
    """True when ``graph_def`` holds BFP ops (``PyFunc`` nodes made by ``bfpaccel.tf``)."""
    return any(_is_bfp(n) for n in graph_def.node)


def bfp_op_kinds(graph_def: Any) -> Dict[str, str]:
    """``{node name: kind}`` of the BFP ops in ``graph_def``."""
    return {n.name: n.attr[ATTR_PREFIX + "op"].s.decode() for n in graph_def.node if _is_bfp(n)}


def _ref(inp: str) -> Tuple[str, int, bool]:
    ctrl = inp.startswith("^")
    name, _, port = inp.lstrip("^").partition(":")
    return name, int(port or 0), ctrl


def _attr_s(node: Any, key: str, default: str = "") -> str:
    a = node.attr.get(ATTR_PREFIX + key)
    return a.s.decode() if a is not None and a.WhichOneof("value") == "s" else default


def _attr_b(node: Any, key: str) -> bool:
    a = node.attr.get(ATTR_PREFIX + key)
    return bool(a.b) if a is not None else False


def _attr_f(node: Any, key: str) -> float:
    return float(node.attr[ATTR_PREFIX + key].f)


def _attr_ints(node: Any, key: str) -> List[int]:
    a = node.attr.get(ATTR_PREFIX + key)
    return [int(v) for v in a.list.i] if a is not None else []


def float_graph_def(sess: Any, graph_def: Optional[Any] = None) -> Any:
    """``graph_def`` (default: ``sess.graph``'s) with every BFP op replaced by its float
    TensorFlow op, weights as constants (read with ``sess``), ready for freezing and tf2onnx;
    ``bfpaccel.compile`` of the result computes what the BFP graph computed. Every other node
    is kept as it is (variables stay variables). Raises ValueError naming the node when a
    matrix op's weight is not a constant (it depends on a graph input).

    Example:
        >>> gd = float_graph_def(sess)  # doctest: +SKIP
        >>> frozen = tf.compat.v1.graph_util.convert_variables_to_constants(sess, gd, ["out"])  # doctest: +SKIP
    """
    import tensorflow as tf
    from tensorflow.core.framework import graph_pb2

    graph = sess.graph
    gd = graph_def if graph_def is not None else graph.as_graph_def()
    if not has_bfp_ops(gd):
        return gd
    nodes = {n.name: n for n in gd.node}
    cache: Dict[Tuple[str, int], np.ndarray] = {}
    run: Dict[Tuple[str, int], str] = {}  # tensors read with the session: key -> first user

    def walk(inp: str, user: str, fetch: bool) -> Optional[np.ndarray]:
        """The value of ``inp`` (``fetch``: only note what the session must read)."""
        name, idx, _ = _ref(inp)
        key = (name, idx)
        if key in cache:
            return cache[key]
        node = nodes.get(name)
        if node is None:
            raise ValueError(f"{user}: input {inp!r} is not in the graph")
        if _is_bfp(node):
            kind = _attr_s(node, "op")
            if kind != "fold_batch_norm":
                raise ValueError(f"{user}: its weight comes from {name!r} ({kind}), which is computed from the "
                                 "graph's inputs; the accelerator's matrix ops need constant weights")
            ins = [walk(i, user, fetch) for i in node.input if not i.startswith("^")]
            if fetch:
                return None
            arrs = [np.asarray(a) for a in ins]
            b = arrs.pop(1) if _attr_b(node, "has_bias") else None
            w, gamma, beta, mean, var = arrs
            cache[(name, 0)], cache[(name, 1)] = nm.fold_batch_norm(w, b, gamma, beta, mean, var,
                                                                    _attr_f(node, "epsilon"))
            return cache[key]
        if node.op in ("Identity", "IdentityN", "Snapshot"):
            data = [i for i in node.input if not i.startswith("^")]
            v = walk(data[idx if node.op == "IdentityN" else 0], user, fetch)
        elif node.op == "Const":
            v = tf.make_ndarray(node.attr["value"].tensor)
        elif fetch:
            run.setdefault(key, user)
            return None
        else:
            v = cache[key]
        if v is not None:
            cache[key] = np.asarray(v)
        return v

    def value(inp: str, user: str) -> np.ndarray:
        v = walk(inp, user, False)
        assert v is not None
        return v

    # every constant input, read in one session run (each run of a new fetch list costs)
    for node in gd.node:
        if not _is_bfp(node):
            continue
        kind = _attr_s(node, "op")
        data = [i for i in node.input if not i.startswith("^")]
        if kind in ("conv2d", "matmul"):
            consts = data[1:2] + (data[2:3] if _attr_b(node, "has_bias") else [])
        elif kind in ("batch_norm", "l2_normalize"):
            consts = data[1:]
        elif kind == "fold_batch_norm":
            consts = [f"{node.name}:0"]
        else:
            consts = []
        for c in consts:
            walk(c, node.name, True)
    if run:
        keys = list(run)
        try:
            vals = sess.run([graph.get_tensor_by_name(f"{n}:{i}") for n, i in keys])
        except Exception as exc:  # a placeholder without default, an op that cannot run here
            users = sorted({run[k] for k in keys})
            raise ValueError(f"cannot evaluate the constant inputs of the BFP ops ({', '.join(users[:3])}"
                             f"{' ...' if len(users) > 3 else ''}): {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        for k, v in zip(keys, vals):
            cache[k] = np.asarray(v)

    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(gd.versions)
    out.library.CopyFrom(gd.library)
    renames: Dict[str, str] = {}  # "node:port" -> new tensor name, for outputs > 0 that move

    def add(op: str, name: str, inputs: List[str], **attrs: Any) -> Any:
        n = out.node.add()
        n.op, n.name = op, name
        n.input.extend(inputs)
        for k, v in attrs.items():
            _set(tf, n.attr[k], v)
        return n

    def const(name: str, arr: np.ndarray) -> str:
        n = out.node.add()
        n.op, n.name = "Const", name
        arr = np.asarray(arr)
        n.attr["dtype"].type = tf.as_dtype(arr.dtype).as_datatype_enum
        n.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(arr))
        return name

    float_t = tf.float32.as_datatype_enum
    for node in gd.node:
        if node.op == "IdentityN":
            data = [i for i in node.input if not i.startswith("^")]
            ctrl = [i for i in node.input if i.startswith("^")]
            for port, src in enumerate(data):
                out_name = node.name if port == 0 else f"{node.name}__output{port}"
                add("Identity", out_name, [src] + ctrl, T=node.attr["T"].list.type[port])
                if port:
                    renames[f"{node.name}:{port}"] = out_name
            continue
        if not _is_bfp(node):
            m = out.node.add()
            m.CopyFrom(node)
            continue
        kind = _attr_s(node, "op")
        name = node.name
        data = [i for i in node.input if not i.startswith("^")]
        ctrl = [i for i in node.input if i.startswith("^")]
        if kind == "fold_batch_norm":
            value(f"{name}:0", name)
            const(name, cache[(name, 0)])
            const(f"{name}__output1", cache[(name, 1)])
            renames[f"{name}:1"] = f"{name}__output1"
        elif kind in ("conv2d", "matmul"):
            has_b, has_r = _attr_b(node, "has_bias"), _attr_b(node, "has_residual")
            x = data[0]
            w = const(f"{name}/weights", value(data[1], name).astype(np.float32))
            pos = 2
            if kind == "conv2d":
                pad = _attr_s(node, "padding", "VALID")
                y = add("Conv2D", f"{name}/Conv2D", [x, w] + ctrl, T=float_t,
                        strides=[1, *_attr_ints(node, "strides"), 1],
                        padding=pad.encode(), dilations=[1, *_attr_ints(node, "dilations"), 1],
                        explicit_paddings=([0, 0] + _attr_ints(node, "explicit_paddings") + [0, 0]) if pad == "EXPLICIT"
                        else [], data_format=b"NHWC", use_cudnn_on_gpu=True).name
            else:
                rank = graph.get_operation_by_name(name).inputs[0].shape.rank
                if rank == 2:
                    y = add("MatMul", f"{name}/MatMul", [x, w] + ctrl, T=float_t, transpose_a=False,
                            transpose_b=False).name
                else:
                    y = add("BatchMatMulV2", f"{name}/MatMul", [x, w] + ctrl, T=float_t, adj_x=False,
                            adj_y=False).name
            if has_b:
                b = const(f"{name}/bias", value(data[pos], name).astype(np.float32).reshape(-1))
                pos += 1
                y = add("BiasAdd", f"{name}/BiasAdd", [y, b], T=float_t, data_format=b"NHWC").name
            if has_r:
                y = add("AddV2", f"{name}/add", [y, data[pos]], T=float_t).name
            act = _attr_s(node, "activation")
            add("Relu" if act == "relu" else "Identity", name, [y], T=float_t)
        elif kind == "round":
            add("Identity", name, [data[0]] + ctrl, T=float_t)
        elif kind == "add":
            add("AddV2", name, data[:2] + ctrl, T=float_t)
        elif kind == "relu":
            add("Relu", name, [data[0]] + ctrl, T=float_t)
        elif kind == "spatial_mean":
            axes = const(f"{name}/axes", np.asarray([1, 2], np.int32))
            add("Mean", name, [data[0], axes] + ctrl, T=float_t, Tidx=tf.int32.as_datatype_enum, keep_dims=True)
        elif kind == "avg_pool":
            add("AvgPool", name, [data[0]] + ctrl, T=float_t, ksize=[1, *_attr_ints(node, "ksize"), 1],
                strides=[1, *_attr_ints(node, "strides"), 1], padding=_attr_s(node, "padding").encode(),
                data_format=b"NHWC")
        elif kind == "softmax":
            add("Softmax", name, [data[0]] + ctrl, T=float_t)
        elif kind == "batch_norm":
            params = [const(f"{name}/{p}", value(data[1 + i], name).astype(np.float32).reshape(-1))
                      for i, p in enumerate(("gamma", "beta", "mean", "variance"))]
            add("FusedBatchNormV3", name, [data[0]] + params + ctrl, T=float_t, U=float_t,
                epsilon=_attr_f(node, "epsilon"), is_training=False, data_format=b"NHWC",
                exponential_avg_factor=1.0)
        elif kind == "l2_normalize":
            x = data[0]
            g = const(f"{name}/gamma", value(data[1], name).astype(np.float32))
            sq = add("Square", f"{name}/Square", [x] + ctrl, T=float_t).name
            axis = const(f"{name}/axis", np.asarray([-1], np.int32))
            s = add("Sum", f"{name}/Sum", [sq, axis], T=float_t, Tidx=tf.int32.as_datatype_enum, keep_dims=True).name
            eps = const(f"{name}/epsilon", np.asarray(_attr_f(node, "epsilon"), np.float32))
            m = add("Maximum", f"{name}/Maximum", [s, eps], T=float_t).name
            r = add("Rsqrt", f"{name}/Rsqrt", [m], T=float_t).name
            rg = add("Mul", f"{name}/mul", [r, g], T=float_t).name
            add("Mul", name, [x, rg], T=float_t)
        else:
            raise ValueError(f"node {name!r}: unknown BFP op kind {kind!r}")
    if renames:
        for n in out.node:
            for i, inp in enumerate(n.input):
                nm_, port, ctrl_ = _ref(inp)
                if not ctrl_ and f"{nm_}:{port}" in renames:
                    n.input[i] = renames[f"{nm_}:{port}"]
    return out


def _set(tf: Any, attr: Any, v: Any) -> None:
    if isinstance(v, bool):
        attr.b = v
    elif isinstance(v, bytes):
        attr.s = v
    elif isinstance(v, float):
        attr.f = v
    elif isinstance(v, int) and not isinstance(v, bool):
        # DataType enums and plain ints: the attributes set here that are types are named T/U/Tidx
        attr.type = v
    elif isinstance(v, list):
        attr.list.SetInParent()
        attr.list.i.extend(int(t) for t in v)
    else:  # pragma: no cover - internal misuse
        raise TypeError(f"attribute value {v!r}")
