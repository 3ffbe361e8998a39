"""VGG-16 (seed: ``Vgg16``, ``QuantizedVgg16``).

Architecture: TF-slim ``vgg_16`` (13 3x3 SAME convs with biases, 2x2/2 VALID max pools, ``fc6`` a
7x7 VALID conv to 4096, ``fc7`` a 1x1 conv to 4096, ``fc8`` a 1x1 conv to 1000 + ``squeezed``);
dropout is left out (inference graph). It equals ``keras.applications.VGG16``: Keras ``fc1``
(Flatten of NHWC 7x7x512 -> 4096) is ``fc6`` with its kernel reshaped to [7,7,512,4096], ``fc2``
is ``fc7`` and ``predictions`` is ``fc8``. The feature is ``vgg_16/fc7/Relu`` [N,1,1,4096]; the
default classifier returns the **logits** ``vgg_16/fc8/squeezed`` (no softmax), as the seed.
"""

from __future__ import annotations

from typing import Any

from .accel_model import AccelModel, GraphBuilder

__all__ = ["Vgg16", "QuantizedVgg16"]

_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def vgg16_convs(b: GraphBuilder, x: Any, pools: Any = None, keras: bool = True) -> list:
    """The 13 VGG-16 conv layers in the current scope (``conv{i}/conv{i}_{j}``); returns the
    output of each block before its pool. ``pools(i, x)`` pools after block ``i`` (0-based,
    default 2x2/2 VALID, also after the last block)."""
    ends = []
    for i, (n, c) in enumerate(_BLOCKS):
        with b.scope(f"conv{i + 1}"):
            for j in range(n):
                with b.scope(f"conv{i + 1}_{j + 1}"):
                    k = f"block{i + 1}_conv{j + 1}" if keras else None
                    x = b.relu(b.conv(x, c, 3, 1, "SAME", kind="conv_in" if i == j == 0 else "conv", keras=k))
        ends.append(x)
        if pools is None:
            with b.scope(f"pool{i + 1}"):
                x = b.max_pool(x, 2, 2, "VALID")
        else:
            x = pools(i, x)
    return ends + [x]


class Vgg16(AccelModel):
    """VGG-16 featurizer: [N,224,224,3] -> ``brainwave_target_node_1_Version_0.1:0``
    [N,1,1,4096] (``vgg_16/fc7/Relu``); classifier ``classifier/vgg_16/fc8/squeezed:0`` (logits).
    Store folder ``vgg16/1.1.3``.

    Example:
        >>> Vgg16("/tmp/models", weights="random").model_ref
        'vgg16'
    """

    _model_folder, _version, _save_name = "vgg16", "1.1.3", "vgg16"
    _prefix = "vgg_16/"
    _keras_app = "VGG16"
    _classifier_input = "vgg_16/fc7/Relu:0"
    _classifier_output = "vgg_16/fc8/squeezed:0"
    _output_dims = ((None, 1, 1, 4096),)

    @classmethod
    def _forward(cls, b: GraphBuilder, x: Any) -> Any:
        with b.scope("vgg_16"):
            x = vgg16_convs(b, x)[-1]
            with b.scope("fc6"):
                x = b.relu(b.conv(x, 4096, 7, 1, "VALID", keras="fc1"))
            with b.scope("fc7"):
                return b.relu(b.conv(x, 4096, 1, 1, "VALID", keras="fc2"))

    @classmethod
    def _head(cls, b: GraphBuilder, feature: Any) -> Any:
        with b.scope("vgg_16"), b.scope("fc8"):
            y = b.conv(feature, 1000, 1, 1, "VALID", kind="linear", keras="predictions")
            return b.squeeze(y, [1, 2], name="squeezed")


class QuantizedVgg16(Vgg16):
    """VGG-16 served with BFP quantization (store folder ``msfpvgg16/1.1.2``).
    Its ``import_graph_def`` graph computes what the accelerator computes -- BFP
    convolutions (``format=``, default ``"msfp16"``), the compiled plan's vector arithmetic,
    batch norm folded as ``bfpaccel.compile`` folds it: bit for bit the plan of the float
    graph -- with straight-through gradients for fine-tuning; ``format=None`` builds the float
    graph of :class:`Vgg16`. Same variable and seed tensor names either way.

    Example:
        >>> QuantizedVgg16("/tmp/models", weights="random").version
        '1.1.2'
    """

    _model_folder, _version = "msfpvgg16", "1.1.2"
    quantized = True
