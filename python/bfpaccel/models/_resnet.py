"""ResNet-50 / ResNet-152 (seed: ``Resnet50``, ``QuantizedResnet50``, ``Resnet152``,
``QuantizedResnet152``).

Architecture: the Keras-applications ResNet v1 (``keras.applications.ResNet50/152``), so that
the published Keras ImageNet ``.h5`` weights fit exactly: the stride-2 of a stage sits on the
*first* unit's 1x1 ``conv1`` and its projection ``shortcut`` (stages 2-4; TF-slim
``resnet_v1_50`` puts it on the *last* unit's 3x3 instead, and has no conv biases), convolutions
have biases, batch-norm epsilon is 1.001e-5, conv1 and pool1 pad explicitly (3 and 1) and then
run VALID, as Keras does (TF SAME padding would pad asymmetrically and differ). Variable names
follow TF-slim (``resnet_v1_50/block1/unit_1/bottleneck_v1/conv1/{weights,biases,BatchNorm/...}``),
the feature is ``resnet_v1_50/pool5`` (spatial mean, [N,1,1,2048]) and the default classifier is a
1x1 conv ``logits`` + ``predictions/Softmax`` (the Keras ``predictions`` Dense layer).
"""

from __future__ import annotations

from typing import Any, List

from .accel_model import AccelModel, GraphBuilder

__all__ = ["Resnet50", "QuantizedResnet50", "Resnet152", "QuantizedResnet152"]

_EPS = 1.001e-5


class _ResNet(AccelModel):
    _units: List[int] = []
    _scope: str = ""
    _output_dims = ((None, 1, 1, 2048),)

    @classmethod
    def _forward(cls, b: GraphBuilder, x: Any) -> Any:
        with b.scope(cls._scope):
            with b.scope("conv1"):
                x = b.pad(x, 3)
                x = b.conv(x, 64, 7, 2, "VALID", kind="conv_in", keras="conv1_conv")
                x = b.relu(b.bn(x, _EPS, keras="conv1_bn"))
            with b.scope("pool1"):
                x = b.max_pool(b.pad(x, 1), 3, 2, "VALID")
            for bi, (n, depth) in enumerate(zip(cls._units, (64, 128, 256, 512))):
                with b.scope(f"block{bi + 1}"):
                    for u in range(n):
                        stride = 2 if (u == 0 and bi > 0) else 1
                        k = f"conv{bi + 2}_block{u + 1}"
                        with b.scope(f"unit_{u + 1}"), b.scope("bottleneck_v1"):
                            if u == 0:
                                with b.scope("shortcut"):
                                    shortcut = b.conv(x, 4 * depth, 1, stride, "VALID", kind="linear", keras=f"{k}_0_conv")
                                    shortcut = b.bn(shortcut, _EPS, keras=f"{k}_0_bn")
                            else:
                                shortcut = x
                            with b.scope("conv1"):
                                r = b.conv(x, depth, 1, stride, "VALID", keras=f"{k}_1_conv")
                                r = b.relu(b.bn(r, _EPS, keras=f"{k}_1_bn"))
                            with b.scope("conv2"):
                                r = b.conv(r, depth, 3, 1, "SAME", keras=f"{k}_2_conv")
                                r = b.relu(b.bn(r, _EPS, keras=f"{k}_2_bn"))
                            with b.scope("conv3"):
                                r = b.conv(r, 4 * depth, 1, 1, "VALID", kind="linear", keras=f"{k}_3_conv")
                                r = b.bn(r, _EPS, kind="gamma_last", keras=f"{k}_3_bn")
                            x = b.relu(b.add(shortcut, r, name="add"))
            return b.global_mean(x, name="pool5")

    @classmethod
    def _head(cls, b: GraphBuilder, feature: Any) -> Any:
        with b.scope(cls._scope):
            with b.scope("logits"):
                y = b.conv(feature, 1000, 1, 1, "VALID", kind="linear", keras="predictions")
                y = b.squeeze(y, [1, 2], name="SpatialSqueeze")
            with b.scope("predictions"):
                return b.softmax(y, name="Softmax")


class Resnet50(_ResNet):
    """ResNet-50 featurizer: [N,224,224,3] (RGB, ImageNet means subtracted, scale 1) ->
    ``brainwave_target_node_1_Version_0.1:0`` [N,1,1,2048]; classifier
    ``classifier/resnet_v1_50/predictions/Softmax:0``. Store folder ``rn50/1.1.3``.

    Example:
        >>> Resnet50("/tmp/models", weights="random").model_path.endswith("rn50/1.1.3")
        True
    """

    _model_folder, _version, _save_name = "rn50", "1.1.3", "resnet50"
    _prefix, _scope, _units = "resnet_v1_50/", "resnet_v1_50", [3, 4, 6, 3]
    _keras_app = "ResNet50"
    _classifier_input = "resnet_v1_50/pool5:0"
    _classifier_output = "resnet_v1_50/predictions/Softmax:0"


class QuantizedResnet50(Resnet50):
    """ResNet-50 served with BFP quantization (store folder ``msfprn50/1.1.2``).
    Its ``import_graph_def`` graph computes what the accelerator computes -- BFP
    convolutions (``format=``, default ``"msfp16"``), the compiled plan's vector arithmetic,
    batch norm folded as ``bfpaccel.compile`` folds it: bit for bit the plan of the float
    graph -- with straight-through gradients for fine-tuning; ``format=None`` builds the float
    graph of :class:`Resnet50`. Same variable and seed tensor names either way.

    Example:
        >>> QuantizedResnet50("/tmp/models", weights="random").version
        '1.1.2'
    """

    _model_folder, _version = "msfprn50", "1.1.2"
    quantized = True


class Resnet152(_ResNet):
    """ResNet-152 featurizer: [N,224,224,3] -> [N,1,1,2048]; classifier
    ``classifier/resnet_v1_152/predictions/Softmax:0``. Store folder ``rn152/1.1.2``.

    Example:
        >>> Resnet152("/tmp/models", weights="random").model_ref
        'resnet152'
    """

    _model_folder, _version, _save_name = "rn152", "1.1.2", "resnet152"
    _prefix, _scope, _units = "resnet_v1_152/", "resnet_v1_152", [3, 8, 36, 3]
    _keras_app = "ResNet152"
    _classifier_input = "resnet_v1_152/pool5:0"
    _classifier_output = "resnet_v1_152/predictions/Softmax:0"


class QuantizedResnet152(Resnet152):
    """ResNet-152 served with BFP quantization (store folder ``msfprn152/1.1.3``).
    Its ``import_graph_def`` graph computes what the accelerator computes -- BFP
    convolutions (``format=``, default ``"msfp16"``), the compiled plan's vector arithmetic,
    batch norm folded as ``bfpaccel.compile`` folds it: bit for bit the plan of the float
    graph -- with straight-through gradients for fine-tuning; ``format=None`` builds the float
    graph of :class:`Resnet152`. Same variable and seed tensor names either way.

    Example:
        >>> QuantizedResnet152("/tmp/models", weights="random").version
        '1.1.3'
    """

    _model_folder, _version = "msfprn152", "1.1.3"
    quantized = True
