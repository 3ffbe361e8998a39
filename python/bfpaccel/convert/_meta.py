"""The ONNX ``metadata_props`` the converter writes, read back (onnx only, no TensorFlow)."""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Union

PREPROCESS_KEY = "bfpaccel.preprocess"
OUTPUTS_KEY = "bfpaccel.outputs"
CONVERTER_KEY = "bfpaccel.converter"

__all__ = ["read_onnx_metadata", "PREPROCESS_KEY", "OUTPUTS_KEY", "CONVERTER_KEY"]


def read_onnx_metadata(model: Union[str, Any, Mapping[str, str]]) -> Dict[str, Any]:
    """``{"preprocess": dict | None, "outputs": list | None, "converter": dict | None}`` from
    an ONNX path, a ``ModelProto`` or a ``metadata_props`` dict (e.g. ``Plan.metadata``).

    Example:
        >>> read_onnx_metadata({"bfpaccel.preprocess": '{"kind": "tensor"}'})["preprocess"]
        {'kind': 'tensor'}
    """
    if isinstance(model, Mapping):
        props = dict(model)
    else:
        if isinstance(model, str):
            import onnx

            model = onnx.load(model, load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}

    def get(key: str) -> Any:
        return json.loads(props[key]) if key in props else None

    return {"preprocess": get(PREPROCESS_KEY), "outputs": get(OUTPUTS_KEY), "converter": get(CONVERTER_KEY)}
