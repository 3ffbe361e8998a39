"""SSD300-VGG (seed: ``SsdVgg``, ``QuantizedSsdVgg``).

Architecture: Paul Balanca's SSD-Tensorflow ``ssd_300_vgg`` (the seed adapted its decoding code)
with one change that gives the seed's grids. VGG-16 ``conv1``-``conv5``; ``pool1``-``pool3`` are
2x2/2 **VALID** (floor: 300 -> 150 -> 75 -> **37**, TF-slim's default ``max_pool2d``), ``pool4``
is 2x2/2 **SAME** (ceil: 37 -> 19), ``pool5`` 3x3/1 SAME; ``conv6`` 3x3 x1024 with dilation 6
(one Conv2D with a ``dilations`` attribute, no SpaceToBatch), ``conv7`` 1x1 x1024; ``block8``
1x1x256, pad 1, 3x3/2 VALID x512 (19 -> 10); ``block9`` 1x1x128, pad 1, 3x3/2 VALID x256
(10 -> 5); ``block10``/``block11`` 1x1x128, 3x3 VALID x256 (5 -> 3 -> 1). So the six source
layers (conv4_3, conv7, block8-11) are 37, 19, 10, 5, 3, 1 wide, 8432 anchors (4/6/6/6/4/4 per
cell). The usual SSD300 (Caffe ceil-mode pool3) gives 38 instead; the seed reports 37.

conv4_3 is L2-normalised with plain ops (Square, Sum, Maximum(eps), Rsqrt, Mul) and a
per-channel scale ``block4_box/L2Normalization/gamma``. Each ``block{k}_box`` has a 3x3
``conv_loc`` (anchors*4) reshaped to ``Reshape`` [N,H,W,A,4] and a 3x3 ``conv_cls``
(anchors*21) reshaped to ``Reshape_1`` [N,H,W,A,21]. ``import_graph_def`` returns the 6 class
tensors then the 6 localisation tensors, as the seed. Weights: a checkpoint or
``weights="random"`` (Keras has no SSD, so no ``.h5``).
"""

from __future__ import annotations

from typing import Any, List

from ._vgg16 import vgg16_convs
from .accel_model import AccelModel, GraphBuilder

__all__ = ["SsdVgg", "QuantizedSsdVgg"]

NUM_CLASSES = 21
#: (source layer, grid, anchors per cell)
SOURCE_LAYERS = (("block4", 37, 4), ("block7", 19, 6), ("block8", 10, 6), ("block9", 5, 6),
                 ("block10", 3, 4), ("block11", 1, 4))


class SsdVgg(AccelModel):
    """SSD300-VGG detector: [N,300,300,3] (stretched to 300x300, ImageNet means subtracted)
    -> 12 tensors ``ssd_300_vgg/block{4,7,8,9,10,11}_box/Reshape_1:0`` (class logits) and
    ``.../Reshape:0`` (box offsets). No default classifier (:class:`DoesNotExistError`). Store
    folder ``vggssd/1.1.3``.

    Example:
        >>> SsdVgg("/tmp/models", weights="random").get_input_dims(0)
        (None, 300, 300, 3)
    """

    _model_folder, _version, _save_name = "vggssd", "1.1.3", "ssd_vgg"
    _prefix = "ssd_300_vgg/"
    _input_size = 300
    _output_dims = tuple((None, g, g, a, NUM_CLASSES) for _, g, a in SOURCE_LAYERS) + tuple(
        (None, g, g, a, 4) for _, g, a in SOURCE_LAYERS)

    @classmethod
    def _forward(cls, b: GraphBuilder, x: Any) -> List[Any]:
        tf = b.tf

        def pools(i: int, x: Any) -> Any:
            with b.scope(f"pool{i + 1}"):
                if i < 3:
                    return b.max_pool(x, 2, 2, "VALID")
                if i == 3:
                    return b.max_pool(x, 2, 2, "SAME")
                return b.max_pool(x, 3, 1, "SAME")

        with b.scope("ssd_300_vgg"):
            ends = vgg16_convs(b, x, pools, keras=False)
            sources = [ends[3]]
            x = ends[-1]
            with b.scope("conv6"):
                x = b.relu(b.conv(x, 1024, 3, 1, "SAME", dilation=6))
            with b.scope("conv7"):
                x = b.relu(b.conv(x, 1024, 1, 1, "VALID"))
            sources.append(x)
            for name, mid, out, stride, pad in (("block8", 256, 512, 2, 1), ("block9", 128, 256, 2, 1),
                                                ("block10", 128, 256, 1, 0), ("block11", 128, 256, 1, 0)):
                with b.scope(name):
                    with b.scope("conv1x1"):
                        x = b.relu(b.conv(x, mid, 1, 1, "VALID"))
                    if pad:
                        x = b.pad(x, pad)
                    with b.scope("conv3x3"):
                        x = b.relu(b.conv(x, out, 3, stride, "VALID"))
                sources.append(x)
            logits, locs = [], []
            for (name, grid, anchors), src in zip(SOURCE_LAYERS, sources):
                if int(src.shape[1]) != grid:
                    raise AssertionError(f"{name}: grid {src.shape[1]} != {grid}")  # architecture invariant
                with b.scope(f"{name}_box"):
                    if name == "block4":
                        with b.scope("L2Normalization"):
                            src = b.l2_normalize(src, 1e-12)
                    with b.scope("conv_loc"):
                        loc = b.conv(src, anchors * 4, 3, 1, "SAME", kind="linear")
                    loc = tf.reshape(b.tensor(loc), [-1, grid, grid, anchors, 4], name="Reshape")
                    with b.scope("conv_cls"):
                        cls_ = b.conv(src, anchors * NUM_CLASSES, 3, 1, "SAME", kind="linear")
                    cls_ = tf.reshape(b.tensor(cls_), [-1, grid, grid, anchors, NUM_CLASSES], name="Reshape_1")
                logits.append(cls_)
                locs.append(loc)
            return logits + locs


class QuantizedSsdVgg(SsdVgg):
    """SSD300-VGG served with BFP quantization (store folder ``msfpvggssd/1.1.3``).
    Its ``import_graph_def`` graph computes what the accelerator computes -- BFP
    convolutions (``format=``, default ``"msfp16"``), the compiled plan's vector arithmetic,
    batch norm folded as ``bfpaccel.compile`` folds it: bit for bit the plan of the float
    graph -- with straight-through gradients for fine-tuning; ``format=None`` builds the float
    graph of :class:`SsdVgg`. Same variable and seed tensor names either way.

    Example:
        >>> QuantizedSsdVgg("/tmp/models", weights="random").version
        '1.1.3'
    """

    _model_folder, _version = "msfpvggssd", "1.1.3"
    quantized = True
