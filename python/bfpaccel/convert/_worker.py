"""The conversion subprocess: ``python -m bfpaccel.convert._worker SPEC.json``.

One model per process, because tf2onnx's peak memory is many times the model size and the
process gives all of it back when it exits. The parent (``ConvertOperation``) sends the
spec as JSON, sends stdout/stderr to the log file, and reads the result JSON that this
writes on success; the exit status is the state (0 Succeeded, anything else Failed).

Steps: load the TF1 graph (SavedModel with its variables, or a frozen GraphDef), freeze it,
cut it at the float output of the ``preprocess_array`` front (tf2onnx cannot convert
DecodeJpeg/strings: it writes an invalid model), make that tensor the ONNX input, convert
with tf2onnx, and record the front and the outputs in the ONNX ``metadata_props``.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from ._meta import CONVERTER_KEY, OUTPUTS_KEY, PREPROCESS_KEY


def _log(msg: str) -> None:
    print(f"[bfpaccel.convert {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load(tf: Any, spec: dict) -> Tuple[Any, Any, Dict[str, str], Dict[str, str], List[dict]]:
    """-> (graph, session, input aliases, output aliases, preprocess records)."""
    graph = tf.Graph()
    sess = tf.Session(graph=graph)
    in_alias: Dict[str, str] = {}
    out_alias: Dict[str, str] = {}
    with graph.as_default():
        if spec["kind"] == "saved_model":
            meta = tf.saved_model.loader.load(sess, [spec.get("tag", "serve")], spec["source"])
            for sig in meta.signature_def.values():
                for a, t in sig.inputs.items():
                    in_alias.setdefault(a, t.name)
                for a, t in sig.outputs.items():
                    out_alias.setdefault(a, t.name)
        else:
            gd = tf.GraphDef()
            with open(spec["source"], "rb") as f:
                gd.ParseFromString(f.read())
            tf.import_graph_def(gd, name="")
        records = [json.loads(r.decode() if isinstance(r, bytes) else r)
                   for r in graph.get_collection("bfpaccel_preprocess")]
    return graph, sess, in_alias, out_alias, records


def _find_front(tf: Any, graph: Any, string_input: Any, records: List[dict]) -> Tuple[Any, dict, bool]:
    """The float tensor that ``preprocess_array`` makes of the string input, its recorded
    arguments, and whether they were recorded (True) or inferred from the graph (False)."""
    for r in records:
        if r.get("string_input") in (None, string_input.name):
            return graph.get_tensor_by_name(r["float_output"]), r, True
    # A graph built without the record (e.g. frozen elsewhere): walk forward from the string
    # input to the first float32 [N, H, W, 3] tensor made in a map_normalize_jpeg scope.
    seen, frontier = set(), [string_input.op]
    while frontier:
        op = frontier.pop(0)
        for out in op.outputs:
            shape = out.shape
            if ("map_normalize_jpeg" in op.name and out.dtype == tf.float32 and shape.rank == 4
                    and shape[-1] == 3 and op.type not in ("Placeholder",)):
                h, w = shape[1], shape[2]
                rec = {"kind": "image", "order": "RGB", "scaling_factor": 1.0,
                       "output_height": int(h) if h is not None else 224,
                       "output_width": int(w) if w is not None else 224,
                       "preserve_aspect_ratio": True}
                return out, rec, False
            for consumer in out.consumers():
                if consumer.name not in seen:
                    seen.add(consumer.name)
                    frontier.append(consumer)
    raise ValueError(
        f"the input {string_input.name!r} is a string tensor that feeds no preprocess_array "
        "(map_normalize_jpeg) front that could be cut off: ONNX cannot hold image decoding. "
        "Pass the float image tensor as input_tensors instead.")


def _cut(tf: Any, graph_def: Any, tensor_name: str, shape: List[Optional[int]], output_nodes: List[str]) -> Tuple[Any, str]:
    """Replace the producer of ``tensor_name`` by a float32 Placeholder, freeze the
    PlaceholderWithDefault nodes (``is_training``) to their defaults, keep what the outputs
    need. Returns (graph_def, name of the new input tensor)."""
    node_name, _, idx = tensor_name.partition(":")
    idx_i = int(idx or 0)
    ph_name = node_name if idx_i == 0 else f"{node_name}__output{idx_i}"
    new = tf.GraphDef()
    new.versions.CopyFrom(graph_def.versions)
    new.library.CopyFrom(graph_def.library)
    dims = [-1 if d is None else int(d) for d in shape]
    placeholder = tf.NodeDef(name=ph_name, op="Placeholder")
    placeholder.attr["dtype"].type = tf.float32.as_datatype_enum
    placeholder.attr["shape"].shape.CopyFrom(tf.TensorShape([None if d < 0 else d for d in dims]).as_proto())
    by_name = {n.name: n for n in graph_def.node}
    for n in graph_def.node:
        if n.name == node_name and idx_i == 0:
            new.node.append(placeholder)
            continue
        m = new.node.add()
        m.CopyFrom(n)
        if m.op == "PlaceholderWithDefault" and m.name != node_name:
            # Use the default (is_training=False): as a Const when it is one, so that grappler
            # folds the conds it drives (tf2onnx cannot convert a Merge of two const branches).
            default = by_name.get(m.input[0].lstrip("^").partition(":")[0])
            dtype = m.attr["dtype"].type
            for key in list(m.attr):
                del m.attr[key]
            if default is not None and default.op == "Const":
                m.op = "Const"
                del m.input[:]
                m.attr["dtype"].type = dtype
                m.attr["value"].CopyFrom(default.attr["value"])
            else:
                m.op = "Identity"
                m.attr["T"].type = dtype
        if idx_i:
            for i, inp in enumerate(m.input):
                if inp == tensor_name:
                    m.input[i] = ph_name
    if idx_i:
        new.node.append(placeholder)
    pruned = tf.graph_util.extract_sub_graph(new, output_nodes)
    bad = sorted({n.op for n in pruned.node if n.op in ("DecodeJpeg", "DecodePng", "DecodeImage", "DecodeGif")}
                 | {n.op for n in pruned.node if n.op == "Placeholder" and n.attr["dtype"].type == tf.string.as_datatype_enum})
    if bad:
        raise ValueError(f"the outputs still depend on string/decoding ops ({', '.join(bad)}) after cutting at "
                         f"{tensor_name!r}: ONNX cannot hold them")
    return pruned, f"{ph_name}:0"


def _fold_const_switches(tf: Any, graph_def: Any) -> Any:
    """Dead-branch elimination for Switch nodes with a constant predicate (the lowered
    ``tf.cond(is_training, ...)`` of batch norm once ``is_training`` is its default):
    grappler leaves them, and tf2onnx cannot convert every such Merge."""
    from tensorflow.core.framework import graph_pb2
    from tensorflow.python.framework import tensor_util

    nodes = {n.name: n for n in graph_def.node}
    live_port: Dict[str, int] = {}
    for n in graph_def.node:
        if n.op == "Switch" and len(n.input) == 2:
            pred = nodes.get(n.input[1].partition(":")[0])
            if pred is not None and pred.op == "Const":
                live_port[n.name] = 1 if bool(tensor_util.MakeNdarray(pred.attr["value"].tensor)) else 0
    if not live_port:
        return graph_def

    def ref(inp: str) -> Tuple[str, int, bool]:
        ctrl = inp.startswith("^")
        name, _, port = inp.lstrip("^").partition(":")
        return name, int(port or 0), ctrl

    dead: set = set()
    changed = True
    while changed:  # fixed point; graphs here are small enough
        changed = False
        for n in graph_def.node:
            if n.name in dead:
                continue
            states = []
            for inp in n.input:
                name, port, ctrl = ref(inp)
                states.append(name in dead or (name in live_port and not ctrl and port != live_port[name]))
            if not states:
                continue
            is_dead = all(states) if n.op == "Merge" else any(states)
            if is_dead:
                dead.add(n.name)
                changed = True
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for n in graph_def.node:
        if n.name in dead:
            continue
        m = out.node.add()
        m.CopyFrom(n)
        if m.name in live_port:  # Switch -> Identity of its data input
            data = m.input[0]
            del m.input[:]
            m.input.append(data)
            t = m.attr["T"].type
            m.op = "Identity"
            for key in list(m.attr):
                del m.attr[key]
            m.attr["T"].type = t
        elif m.op == "Merge":
            live = [i for i in m.input if not (ref(i)[0] in dead or (ref(i)[0] in live_port and ref(i)[1] != live_port[ref(i)[0]]))]
            if len(live) == 1:
                t = m.attr["T"].type
                del m.input[:]
                m.input.append(live[0])
                m.op = "Identity"
                for key in list(m.attr):
                    del m.attr[key]
                m.attr["T"].type = t
        # references to the live port of a folded Switch now point at the Identity's port 0
        for i, inp in enumerate(m.input):
            name, port, ctrl = ref(inp)
            if name in live_port and not ctrl:
                m.input[i] = name
            elif name in dead and ctrl:
                m.input[i] = ""
        kept = [i for i in m.input if i]
        del m.input[:]
        m.input.extend(kept)
    return out


def _float_bfp_ops(tf: Any, graph: Any, sess: Any, graph_def: Any, output_nodes: List[str]) -> Optional[dict]:
    """A graph built with ``bfpaccel.tf`` ops (the ``Quantized*`` zoo models, BfpConv2D...)
    holds ``PyFunc`` nodes that tf2onnx cannot convert: rewrite the ones the outputs need into
    their float ops (``bfpaccel.tf.float_graph_def``), whose compiled plan computes the same
    numbers. Returns None when there are none, else a summary with the new ``graph_def``."""
    from ..tf._export import ATTR_PREFIX, bfp_op_kinds, float_graph_def

    needed = tf.graph_util.extract_sub_graph(graph_def, output_nodes)
    kinds = bfp_op_kinds(needed)
    if not kinds:
        return None
    by_name = {n.name: n for n in needed.node}
    counts: Dict[str, int] = {}
    settings: Dict[str, set] = {"format": set(), "weight_format": set(), "vector_precision": set()}
    for name, kind in kinds.items():
        counts[kind] = counts.get(kind, 0) + 1
        for key, seen in settings.items():
            a = by_name[name].attr.get(ATTR_PREFIX + key)
            if a is not None and a.s:
                seen.add(a.s.decode())
    _log("BFP ops (bfpaccel.tf) back to their float ops for tf2onnx: "
         + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    info: dict = {"ops": counts, **{k: sorted(v) for k, v in settings.items()}}
    info["graph_def"] = float_graph_def(sess, needed)
    return info


def convert(spec: dict) -> dict:
    """Run one conversion described by ``spec`` (see ``ConvertOperation``); returns the result dict."""
    t0 = time.perf_counter()
    if not spec.get("catch_errors", False):
        os.environ["TF2ONNX_CATCH_ERRORS"] = "false"  # no deep copy of the graph before each optimizer
    import tensorflow.compat.v1 as tf

    tf.disable_eager_execution()
    _log(f"loading {spec['kind']} {spec['source']}")
    graph, sess, in_alias, out_alias, records = _load(tf, spec)

    def tensor(name: str, aliases: Dict[str, str], role: str) -> Tuple[Any, Optional[str]]:
        alias = name if name in aliases else None
        tname = aliases.get(name, name)
        if ":" not in tname:
            tname += ":0"
        try:
            t = graph.get_tensor_by_name(tname)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{role} tensor {name!r}: {exc}") from None
        if alias is None:
            alias = next((a for a, v in aliases.items() if v == t.name), None)
        return t, alias

    in_t, in_alias_name = tensor(spec["input"], in_alias, "input")
    outs = [tensor(o, out_alias, "output") for o in spec["outputs"]]
    out_names = [t.name for t, _ in outs]
    if in_t.dtype == tf.string:
        front_t, rec, recorded = _find_front(tf, graph, in_t, records)
        _log(f"string input {in_t.name}: cutting the graph at the preprocessing output {front_t.name} "
             f"({'recorded by preprocess_array' if recorded else 'parameters inferred from the graph: defaults'})")
        preprocess = {k: rec[k] for k in ("kind", "order", "scaling_factor", "output_height", "output_width",
                                          "preserve_aspect_ratio")}
        preprocess.update(string_input=in_t.name, input_alias=in_alias_name)
        if not recorded:
            preprocess["inferred"] = True
    elif in_t.dtype in (tf.float32, tf.float16, tf.float64):
        front_t = in_t
        preprocess = {"kind": "tensor", "input": in_t.name, "input_alias": in_alias_name,
                      "dtype": in_t.dtype.name, "shape": in_t.shape.as_list() if in_t.shape.rank is not None else None}
    else:
        raise ValueError(f"input tensor {in_t.name!r} has dtype {in_t.dtype.name}: expected a string (JPEG bytes, "
                         "cut at preprocess_array) or a float tensor")
    front_shape = front_t.shape.as_list() if front_t.shape.rank is not None else None
    if front_shape is None:
        raise ValueError(f"input tensor {front_t.name!r} has unknown rank: set its shape in the graph")

    output_nodes = sorted({n.partition(":")[0] for n in out_names})
    graph_def = graph.as_graph_def()
    bfp_info = _float_bfp_ops(tf, graph, sess, graph_def, output_nodes)
    if bfp_info is not None:
        graph_def = bfp_info.pop("graph_def")
    _log(f"freezing variables for outputs {', '.join(out_names)}")
    with graph.as_default():
        frozen = tf.graph_util.convert_variables_to_constants(sess, graph_def, output_nodes)
    del graph_def
    sess.close()
    del sess, graph
    gc.collect()
    frozen, onnx_input = _cut(tf, frozen, front_t.name, front_shape, output_nodes)
    _log(f"frozen graph: {len(frozen.node)} nodes, {frozen.ByteSize() / 1e6:.1f} MB; ONNX input {onnx_input}")

    from tf2onnx import convert as tf2onnx_convert
    from tf2onnx import tf_loader
    import tf2onnx

    with tf.Graph().as_default():
        frozen = tf_loader.tf_optimize([onnx_input], out_names, frozen)
    frozen = _fold_const_switches(tf, frozen)
    optimizers: Optional[dict] = None if spec.get("optimize", True) else {}
    _log(f"tf2onnx {tf2onnx.__version__}: opset {spec['opset']}, "
         f"optimizers {'tf2onnx defaults' if optimizers is None else 'none'}"
         f"{', catch_errors' if spec.get('catch_errors') else ''}")
    model, _ = tf2onnx_convert._convert_common(  # the body of tf2onnx.convert.from_graph_def, with optimizers
        frozen, name=os.path.basename(spec["source"].rstrip("/")) or "model", opset=spec["opset"],
        input_names=[onnx_input], output_names=out_names, optimizers=optimizers)
    del frozen
    gc.collect()

    onnx_outputs = [o.name for o in model.graph.output]
    preprocess["onnx_input"] = onnx_input
    outputs_meta = []
    for (t, alias), oname in zip(outs, onnx_outputs):
        outputs_meta.append({"name": t.name, "alias": alias, "onnx_output": oname})
    meta = {
        PREPROCESS_KEY: json.dumps(preprocess),
        OUTPUTS_KEY: json.dumps(outputs_meta),
        CONVERTER_KEY: json.dumps({"tool": f"tf2onnx {tf2onnx.__version__}", "opset": spec["opset"],
                                   "optimize": bool(spec.get("optimize", True)),
                                   "source": os.path.abspath(spec["source"]),
                                   **({"bfp_ops": bfp_info} if bfp_info is not None else {})}),
    }
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            p = model.metadata_props.add()
            p.key, p.value = k, v

    import onnx

    out_path = spec["output_path"]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".partial"
    onnx.save(model, tmp)
    os.replace(tmp, out_path)  # a reader never sees half a model
    try:
        onnx.checker.check_model(out_path)
    except onnx.checker.ValidationError as exc:
        os.remove(out_path)
        raise ValueError(f"tf2onnx wrote an invalid ONNX model: {exc}") from None
    result = {"output_path": out_path, "onnx_input": onnx_input, "onnx_outputs": onnx_outputs,
              "metadata": meta, "seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(_peak_rss_mb(), 1)}
    _log(f"wrote {out_path} ({os.path.getsize(out_path) / 1e6:.1f} MB) in {result['seconds']} s, "
         f"peak RSS {result['peak_rss_mb']} MB")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bfpaccel.convert._worker SPEC.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    try:
        if spec.get("fail_for_test"):
            raise RuntimeError(spec["fail_for_test"])
        if spec.get("sleep_for_test"):
            time.sleep(float(spec["sleep_for_test"]))
        result = convert(spec)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        print(f"BFPACCEL_CONVERT_ERROR: {type(exc).__name__}: {exc}", flush=True)
        return 1
    with open(spec["result_path"] + ".partial", "w") as f:
        json.dump(result, f)
    os.replace(spec["result_path"] + ".partial", spec["result_path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
