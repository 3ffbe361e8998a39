"""DenseNet-121 (seed: ``Densenet121``, ``QuantizedDensenet121``).

Architecture: ``keras.applications.DenseNet121`` (growth 32, blocks 6/12/24/16, bottleneck 4x,
compression 0.5, pre-activation BN-ReLU-Conv, convs without biases, BN epsilon 1.001e-5; conv1
and pool1 pad explicitly then run VALID), so Keras ImageNet ``.h5`` weights fit. Variable names
follow the TF-slim DenseNet layout (``densenet121/dense_block1/conv_block1/x1/BatchNorm/gamma``,
``.../x1/Conv/weights``, ``densenet121/transition_block1/blk/...``, ``densenet121/final_block/
BatchNorm``). The feature is ``densenet121/final_block/global_avg_pool/Mean`` [N,1,1,1024] and
the classifier ``densenet121/predictions/Softmax`` (names end in ``:0``: fixed seed-1.62 bug).
Expected input: RGB with ImageNet means subtracted, scaled by 0.017
(``preprocess_array(x, "RGB", 0.017)``), as the seed's docstring says.
"""

from __future__ import annotations

from typing import Any

from .accel_model import AccelModel, GraphBuilder

__all__ = ["Densenet121", "QuantizedDensenet121"]

_EPS = 1.001e-5
_BLOCKS = (6, 12, 24, 16)
_GROWTH = 32


class Densenet121(AccelModel):
    """DenseNet-121 featurizer: [N,224,224,3] -> ``brainwave_target_node_1_Version_0.1:0``
    [N,1,1,1024]; classifier ``classifier/densenet121/predictions/Softmax:0``. Store folder
    ``dn121/1.1.4``.

    Example:
        >>> Densenet121("/tmp/models", weights="random").model_ref
        'densenet121'
    """

    _model_folder, _version, _save_name = "dn121", "1.1.4", "densenet121"
    _prefix = "densenet121"
    _input_std = 1.0
    _keras_app = "DenseNet121"
    _classifier_input = "densenet121/final_block/global_avg_pool/Mean:0"
    _classifier_output = "densenet121/predictions/Softmax:0"
    _output_dims = ((None, 1, 1, 1024),)

    @classmethod
    def _forward(cls, b: GraphBuilder, x: Any) -> Any:
        with b.scope("densenet121"):
            with b.scope("conv1"):
                x = b.conv(b.pad(x, 3), 64, 7, 2, "VALID", bias=False, kind="conv_in", keras="conv1_conv")
                x = b.relu(b.bn(x, _EPS, keras="conv1_bn"))
            with b.scope("pool1"):
                x = b.max_pool(b.pad(x, 1), 3, 2, "VALID")
            for bi, n in enumerate(_BLOCKS):
                with b.scope(f"dense_block{bi + 1}"):
                    for i in range(n):
                        k = f"conv{bi + 2}_block{i + 1}"
                        with b.scope(f"conv_block{i + 1}"):
                            with b.scope("x1"):
                                y = b.relu(b.bn(x, _EPS, keras=f"{k}_0_bn"))
                                with b.scope("Conv"):
                                    y = b.conv(y, 4 * _GROWTH, 1, 1, "VALID", bias=False, keras=f"{k}_1_conv")
                            with b.scope("x2"):
                                y = b.relu(b.bn(y, _EPS, keras=f"{k}_1_bn"))
                                with b.scope("Conv"):
                                    y = b.conv(y, _GROWTH, 3, 1, "SAME", bias=False, keras=f"{k}_2_conv")
                            x = b.concat([x, y], axis=3, name="concat")
                if bi < len(_BLOCKS) - 1:
                    k = f"pool{bi + 2}"
                    with b.scope(f"transition_block{bi + 1}"), b.scope("blk"):
                        x = b.relu(b.bn(x, _EPS, keras=f"{k}_bn"))
                        with b.scope("Conv"):
                            x = b.conv(x, int(x.shape[-1]) // 2, 1, 1, "VALID", bias=False, keras=f"{k}_conv")
                        x = b.avg_pool(x, 2, 2, "VALID")
            with b.scope("final_block"):
                x = b.relu(b.bn(x, _EPS, keras="bn"))
                with b.scope("global_avg_pool"):
                    return b.global_mean(x, name="Mean")

    @classmethod
    def _head(cls, b: GraphBuilder, feature: Any) -> Any:
        with b.scope("densenet121"):
            with b.scope("logits"):
                y = b.conv(feature, 1000, 1, 1, "VALID", kind="linear", keras="predictions")
                y = b.squeeze(y, [1, 2], name="SpatialSqueeze")
            with b.scope("predictions"):
                return b.softmax(y, name="Softmax")


class QuantizedDensenet121(Densenet121):
    """DenseNet-121 served with BFP quantization (store folder ``msfpdn121/1.1.4``).
    Its ``import_graph_def`` graph computes what the accelerator computes -- BFP
    convolutions (``format=``, default ``"msfp16"``), the compiled plan's vector arithmetic,
    batch norm folded as ``bfpaccel.compile`` folds it: bit for bit the plan of the float
    graph -- with straight-through gradients for fine-tuning; ``format=None`` builds the float
    graph of :class:`Densenet121`. Same variable and seed tensor names either way.

    Example:
        >>> QuantizedDensenet121("/tmp/models", weights="random").version
        '1.1.4'
    """

    _model_folder, _version = "msfpdn121", "1.1.4"
    quantized = True
