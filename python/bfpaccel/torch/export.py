"""ONNX export of BFP modules, in the form ``bfpaccel.compile`` turns back into the same numbers.

The ``bfpaccel::`` ops are written as the *float* ONNX ops they emulate, with the original float
weights: ``bfpaccel::linear`` -> ``Gemm(transB=1)`` (inputs of rank other than 2 are flattened
to ``[M, K]`` and reshaped back), ``bfpaccel::matmul`` -> ``MatMul``, ``bfpaccel::conv2d`` ->
``Conv`` with explicit ``pads``.  ``bfpaccel.compile(model, format=...)`` then quantizes those
weights exactly as the Bfp layers did and runs the bias as the same epilogue, so a plan from
the exported model computes what the module computed, bit for bit, where every vector op in
between also agrees (see ``docs/torch.md``: ReLU / max pool / reshapes on the fp16 outputs of
biased layers do; float32 vector ops the plan rounds to its vector precision -- an activation
right after a bias-free layer, an average pool, a residual add -- differ by that rounding).
Stochastic rounding matches for dense layers only: a convolution's activations draw their
random bits by NCHW index in ``bfpaccel.conv2d`` and by channels-last index in the plan.

The exporter is PyTorch's ``torch.export``-based one (``torch.onnx.export(..., dynamo=True)``),
which needs ``onnxscript`` (the ``torch`` extra installs it).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..formats import Format, get_format
from ._ops import decode_format

__all__ = ["export_onnx", "onnx_translation_table", "plan_options", "to_plan", "MixedFormatsError"]

_MATRIX_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose", "QLinearConv", "QLinearMatMul", "MatMulInteger",
               "ConvInteger")
_META_KEYS = ("bfpaccel.format", "bfpaccel.weight_format", "bfpaccel.vector_precision", "bfpaccel.seed")


class MixedFormatsError(ValueError):
    """The module cannot become one plan: ``bfpaccel.compile`` applies a single format (and
    vector precision, and seed) to every matrix op, but the module's layers differ, or it has
    float matrix ops that the plan would quantize."""


def _onnxscript_opset() -> Any:
    try:
        from onnxscript import opset18
    except ImportError as e:  # pragma: no cover - the torch extra installs it
        raise ImportError("ONNX export of bfpaccel.torch modules needs onnxscript (PyTorch's ONNX exporter): "
                          "pip install 'bfpaccel[torch]' (or pip install onnxscript)") from e
    return opset18


Record = Tuple[str, str, str, str, int]  # (op, format, weight format, vector precision, seed)


def onnx_translation_table(record: Optional[List[Record]] = None) -> Dict[Callable, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)`` that writes
    the ``bfpaccel::`` ops as float ``Gemm`` / ``MatMul`` / ``Conv``.  Each translated op appends
    ``(op, format, weight_format, vector_precision, seed)`` (``op``: ``"linear"``, ``"matmul"`` or
    ``"conv2d"``; encoded formats; ``""`` as the vector precision of a matmul) to ``record``.
    ``bfpaccel::fake_quantize`` has no ONNX form the runtime executes: translating it raises.
    """
    op = _onnxscript_opset()
    rec: List[Record] = record if record is not None else []

    def linear(x: Any, weight: Any, bias: Any = None, fmt: str = "", wfmt: str = "", vp: str = "fp16",
               seed: int = 0) -> Any:
        rec.append(("linear", fmt, wfmt, vp, int(seed)))
        rank = len(x.shape)
        flat = x if rank == 2 else op.Flatten(x, axis=rank - 1)
        y = op.Gemm(flat, weight, transB=1) if bias is None else op.Gemm(flat, weight, bias, transB=1)
        if rank == 2:
            return y
        n = op.Shape(weight, start=0, end=1)
        lead = op.Shape(x, start=0, end=rank - 1)
        return op.Reshape(y, op.Concat(lead, n, axis=0))

    def matmul(x: Any, w: Any, fmt: str = "", wfmt: str = "", seed: int = 0) -> Any:
        rec.append(("matmul", fmt, wfmt, "", int(seed)))
        return op.MatMul(x, w)

    def conv2d(x: Any, weight: Any, bias: Any = None, stride: Sequence[int] = (1, 1),
               padding: Sequence[int] = (0, 0, 0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1,
               fmt: str = "", wfmt: str = "", vp: str = "fp16", seed: int = 0) -> Any:
        rec.append(("conv2d", fmt, wfmt, vp, int(seed)))
        t, l, b, r = (int(v) for v in padding)
        attrs = dict(strides=[int(s) for s in stride], pads=[t, l, b, r], dilations=[int(d) for d in dilation],
                     group=int(groups))
        if bias is None:
            return op.Conv(x, weight, **attrs)
        return op.Conv(x, weight, bias, **attrs)

    def fake_quantize(x: Any, fmt: str = "", axis: int = -1, seed: int = 0) -> Any:
        raise NotImplementedError(
            "bfpaccel::fake_quantize has no ONNX form that bfpaccel.compile runs: the plan quantizes the operands "
            "of its matrix ops itself; export the model without bfpaccel.torch.fake_quantize")

    return {
        torch.ops.bfpaccel.linear.default: linear,
        torch.ops.bfpaccel.matmul.default: matmul,
        torch.ops.bfpaccel.conv2d.default: conv2d,
        torch.ops.bfpaccel.fake_quantize.default: fake_quantize,
    }


def _count_matrix_ops(model: Any) -> int:
    n = sum(1 for node in model.graph.node if node.op_type in _MATRIX_OPS)
    for fn in model.functions:
        n += sum(1 for node in fn.node if node.op_type in _MATRIX_OPS)
    return n


def _check_uniform(record: List[Record], n_matrix: int) -> Optional[Tuple[str, str, str, int]]:
    """The one (format, weight format, vector precision, seed) of the recorded ops, or a
    MixedFormatsError (a ``matmul`` has no bias, hence no vector precision: any agrees with it)."""
    if not record:
        return None
    settings = sorted({(f, w, s) for _, f, w, _, s in record})
    vps = sorted({vp for _, _, _, vp, _ in record if vp})
    if len(settings) > 1 or len(vps) > 1:
        shown = "; ".join(f"format={decode_format(f).name or f}, weight_format={decode_format(w).name or w}, seed={s}"
                          for f, w, s in settings)
        raise MixedFormatsError(
            f"the module's BFP ops use different settings (formats/seeds: {shown}; vector precisions: "
            f"{', '.join(vps) or '-'}); bfpaccel.compile applies one format, vector precision and seed to every "
            "matrix op, so the plan would not compute what the module does (pass strict=False to export anyway)")
    if n_matrix > len(record):
        raise MixedFormatsError(
            f"the exported graph has {n_matrix - len(record)} float matrix op(s) (Gemm/MatMul/Conv not from a Bfp "
            "layer: a layer kept float, or a float F.linear / matmul / conv) that bfpaccel.compile would quantize; "
            "the plan would not compute what the module does (pass strict=False to export anyway)")
    f, w, s = settings[0]
    if any(op == "conv2d" for op, *_ in record) and "stochastic" in (decode_format(f).rounding,
                                                                      decode_format(w).rounding):
        raise MixedFormatsError(
            "stochastic rounding of a convolution: bfpaccel.conv2d (and so BfpConv2d) draws the random bits of an "
            "activation by its NCHW element index, the plan by its channels-last one, so the plan would round "
            "differently; re-quantize with a deterministic rounding for export (pass strict=False to export anyway)")
    return f, w, vps[0] if vps else "fp16", s


def export_onnx(module: torch.nn.Module, args: Tuple[Any, ...], f: Union[str, "os.PathLike[str]", None] = None, *,
                kwargs: Optional[Dict[str, Any]] = None, input_names: Optional[Sequence[str]] = None,
                output_names: Optional[Sequence[str]] = None, dynamic_shapes: Any = None, opset_version: int = 18,
                strict: bool = True) -> Any:
    """Export a module with BFP layers to ONNX for ``bfpaccel.compile``.

    The Bfp ops become float ``Gemm`` / ``MatMul`` / ``Conv`` with the module's float weights
    (see the module docstring); the BFP settings are stored in the model's ``metadata_props``
    (``bfpaccel.format``, ``bfpaccel.weight_format``, ``bfpaccel.vector_precision``,
    ``bfpaccel.seed``; :func:`to_plan` compiles with them).  Call ``module.eval()`` first
    (dropout, batch-norm statistics), as for any export.

    Args:
        module: the model (e.g. from :func:`bfpaccel.torch.quantize_model`).
        args: example inputs (a tuple).
        f: where to write the ``.onnx`` file too (optional).
        kwargs, input_names, output_names, dynamic_shapes, opset_version: as ``torch.onnx.export``.
        strict: refuse a module that one plan cannot reproduce -- Bfp ops with different
            formats / vector precisions / seeds, float matrix ops that the plan would
            quantize, or a convolution with stochastic rounding -- with
            :class:`MixedFormatsError`.

    Returns:
        The ``onnx.ModelProto``.

    Example:
        >>> m = export_onnx(quantize_model(nn.Sequential(nn.Linear(8, 4))).eval(), (torch.randn(1, 8),))  # doctest: +SKIP
        >>> plan = bfpaccel.compile(m, format="msfp16")  # doctest: +SKIP
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    record: List[Record] = []
    table = onnx_translation_table(record)
    program = torch.onnx.export(module, args, None, kwargs=kwargs, input_names=input_names,
                                output_names=output_names, dynamic_shapes=dynamic_shapes,
                                opset_version=opset_version, dynamo=True, custom_translation_table=table,
                                verbose=False)
    if program is None:  # pragma: no cover - the dynamo exporter always returns its program
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    model = program.model_proto
    if strict:
        settings = _check_uniform(record, _count_matrix_ops(model))
    else:
        settings = record[0][1:] if record else None
    if settings is not None:
        fmt, wfmt, vp, seed = settings
        props = {"bfpaccel.format": fmt, "bfpaccel.weight_format": wfmt, "bfpaccel.vector_precision": vp or "fp16",
                 "bfpaccel.seed": str(seed)}
        keep = [p for p in model.metadata_props if p.key not in props]
        del model.metadata_props[:]
        model.metadata_props.extend(keep)
        for k, v in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
    if f is not None:
        import onnx

        onnx.save(model, os.fspath(f))
    return model


def plan_options(model: Any) -> Dict[str, Any]:
    """``bfpaccel.compile`` keywords from the metadata ``export_onnx`` wrote (empty if none)."""
    props = {p.key: p.value for p in model.metadata_props}
    if "bfpaccel.format" not in props:
        return {}
    return dict(format=decode_format(props["bfpaccel.format"]),
                weight_format=decode_format(props["bfpaccel.weight_format"]),
                vector_precision=props.get("bfpaccel.vector_precision", "fp16"),
                seed=int(props.get("bfpaccel.seed", "0")))


def to_plan(module: torch.nn.Module, args: Tuple[Any, ...], *, format: Union[str, Format, None] = None,
            **export_kwargs: Any) -> Any:
    """``bfpaccel.compile(export_onnx(module, args), <the module's BFP settings>)``: a plan that
    computes what ``module`` does (see :func:`export_onnx`).  ``format`` is needed only for a
    module without Bfp layers.

    Example:
        >>> plan = to_plan(qmodel.eval(), (x,), input_names=["x"])  # doctest: +SKIP
        >>> bfpaccel.Session(plan).run(None, {"x": x.numpy()})  # doctest: +SKIP
    """
    from ..runtime import compile as bfp_compile

    model = export_onnx(module, args, **export_kwargs)
    opts = plan_options(model)
    if not opts:
        if format is None:
            raise ValueError("the module has no Bfp layers: give format= for bfpaccel.compile")
        opts = {"format": format}
    elif format is not None and get_format(format) != opts["format"]:
        raise ValueError(f"format={format!r} differs from the module's Bfp layers ({opts['format']})")
    return bfp_compile(model, **opts)

