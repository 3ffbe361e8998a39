"""``AccelModel``: the base class of the model zoo (the seed's ``azureml.accel.models.AccelModel``).

The seed downloaded a pre-built metagraph (``{save_name}_bw.meta``) and imported it. Here each
architecture is *code*: one function per network, written with raw TensorFlow ops over a
weight getter (:class:`GraphBuilder`). The same function builds

* the TF1 graph (``import_graph_def``: getter = ``tf.compat.v1.get_variable``, TF-slim variable
  names, the seed's tensor names),
* the frozen default-classifier GraphDef (getter = ``tf.constant``), imported as the seed
  imported its ``{save_name}_classifier.pb``,
* the Keras 3 model (``keras_model``: getter = the weights of one Keras layer) and the TF2
  SavedModel (``export_saved_model``),

so there is a single architecture definition. The ``Quantized*`` classes build the TF1 graph
with ``BfpGraphBuilder`` instead (``bfpaccel.models._bfp_builder``): the same architecture and
variables over :mod:`bfpaccel.tf` ops, computing what the compiled BFP plan of the float graph
computes (``AccelOnnxConverter`` turns those ops back into the float ones). ``keras_model`` and
``export_saved_model`` always give the float network. Only ONNX-friendly ops are used (Conv2D with
``dilations``, FusedBatchNormV3 in inference form, Relu, MaxPool, AvgPool, Mean, Pad, ConcatV2,
Reshape, Squeeze, Softmax, Add, Mul, Rsqrt, Sum, Maximum).

Weights (``weights=`` of every constructor): ``None`` = the local store (a TF checkpoint in
``custom_weights_directory`` or ``{model_base_path}/{folder}/{version}``; nothing is ever
downloaded), ``"random"`` = deterministic seeded synthetic weights, or the path of a
Keras-applications ``.h5`` file. TensorFlow is imported inside methods only.

Seed quirks fixed here (documented deviations):

* ``_input_tensor_list`` is per instance (the seed's was a class-level list shared by all models).
* ``is_frozen`` removes each of the model's variables from TRAINABLE_VARIABLES and keeps every
  other variable (the seed re-added the whole list object as one element).
* ``get_default_classifier`` reads ``{model_dir}/{save_name}_classifier.pb`` (the seed's doubled
  ``{model_dir}/{folder}/{version}/...`` path is also accepted), and DenseNet's names end in
  ``:0`` (broken in seed 1.62).
* Batch norm always uses its moving statistics (inference form, exports to one ONNX
  BatchNormalization). The ``is_training`` placeholder is still created for API parity but does
  not switch batch norm to batch statistics.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._weights import (
    WeightSpec,
    arrays_from_keras_layers,
    find_checkpoint_files,
    latest_checkpoint,
    random_arrays,
    read_checkpoint,
    read_keras_h5,
)
from .doesnotexisterror import DoesNotExistError

__all__ = ["AccelModel", "GraphBuilder", "FEATURE_TENSOR_NAME"]

_DEFAULT_FORMAT: Any = object()  # "msfp16" for the Quantized* classes, None for the float ones

#: Name of the feature tensor every classifier backbone returns (the seed's metagraph output).
FEATURE_TENSOR_NAME = "brainwave_target_node_1_Version_0.1:0"

Getter = Callable[[WeightSpec], Any]


class GraphBuilder:
    """Raw-TF-op layer helpers over a weight getter, with TF-slim scoping.

    ``scope(name)`` nests both the weight names and (absolute) op name scopes, so
    ``with b.scope("resnet_v1_50"), b.scope("conv1"): b.conv(...)`` asks the getter for
    ``resnet_v1_50/conv1/weights`` and names the op ``resnet_v1_50/conv1/Conv2D``.

    Example:
        >>> b = GraphBuilder(lambda spec: None)  # doctest: +SKIP
    """

    def __init__(self, getter: Getter) -> None:
        import tensorflow as tf

        self.tf = tf
        self._getter = getter
        self._stack: List[str] = []

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Enter ``name`` for weight names and op names (absolute, never uniquified)."""
        self._stack.append(name)
        try:
            with self.tf.name_scope("/".join(self._stack) + "/"):
                yield
        finally:
            self._stack.pop()

    def var(self, name: str, shape: Sequence[int], kind: str, keras: Optional[Tuple[str, int]] = None) -> Any:
        """The tensor of weight ``name`` in the current scope, from the getter."""
        full = "/".join(self._stack + [name])
        return self._getter(WeightSpec(full, tuple(int(s) for s in shape), kind, keras))

    def conv(self, x: Any, cout: int, k: int, stride: int = 1, padding: str = "SAME", dilation: int = 1,
             bias: bool = True, kind: str = "conv", keras: Optional[str] = None) -> Any:
        """Conv2D (NHWC, ``weights`` [k,k,cin,cout]) plus optional ``biases``; no activation."""
        tf = self.tf
        cin = int(x.shape[-1])
        w = self.var("weights", (k, k, cin, cout), kind, (keras, 0) if keras else None)
        y = tf.nn.conv2d(x, w, strides=[1, stride, stride, 1], padding=padding,
                         dilations=[1, dilation, dilation, 1], name="Conv2D")
        if bias:
            b = self.var("biases", (cout,), "bias", (keras, 1) if keras else None)
            y = tf.nn.bias_add(y, b, name="BiasAdd")
        return y

    def bn(self, x: Any, eps: float, kind: str = "gamma", keras: Optional[str] = None) -> Any:
        """Inference batch norm (FusedBatchNormV3) with TF-slim names under ``BatchNorm``."""
        c = int(x.shape[-1])
        with self.scope("BatchNorm"):
            src = (lambda i: (keras, i)) if keras else (lambda i: None)
            gamma = self.var("gamma", (c,), kind, src(0))
            beta = self.var("beta", (c,), "beta", src(1))
            mean = self.var("moving_mean", (c,), "mean", src(2))
            var = self.var("moving_variance", (c,), "var", src(3))
            y, _, _ = self.tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, mean, var, epsilon=eps,
                                                            is_training=False, name="FusedBatchNormV3")
        return y

    def relu(self, x: Any, name: str = "Relu") -> Any:
        """ReLU."""
        return self.tf.nn.relu(x, name=name)

    def pad(self, x: Any, p: int) -> Any:
        """Zero-pad height and width by ``p`` on each side (Keras ``ZeroPadding2D``)."""
        return self.tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]], name="Pad")

    def max_pool(self, x: Any, k: int, s: int, padding: str = "VALID", name: str = "MaxPool") -> Any:
        """Max pooling."""
        return self.tf.nn.max_pool2d(x, k, s, padding, name=name)

    def avg_pool(self, x: Any, k: int, s: int, padding: str = "VALID", name: str = "AvgPool") -> Any:
        """Average pooling."""
        return self.tf.nn.avg_pool2d(x, k, s, padding, name=name)

    def global_mean(self, x: Any, name: str = "Mean") -> Any:
        """Spatial mean with kept dims: [N,H,W,C] -> [N,1,1,C]."""
        return self.tf.reduce_mean(x, axis=[1, 2], keepdims=True, name=name)

    def add(self, a: Any, b: Any, name: str = "add") -> Any:
        """Elementwise sum (a residual connection)."""
        return self.tf.add(a, b, name=name)

    def concat(self, values: Sequence[Any], axis: int, name: str = "concat") -> Any:
        """Concatenation along ``axis``."""
        return self.tf.concat(list(values), axis=axis, name=name)

    def softmax(self, x: Any, name: str = "Softmax") -> Any:
        """Softmax over the last axis."""
        return self.tf.nn.softmax(x, name=name)

    def squeeze(self, x: Any, axis: Sequence[int], name: str) -> Any:
        """``tf.squeeze``."""
        return self.tf.squeeze(x, list(axis), name=name)

    def l2_normalize(self, x: Any, eps: float = 1e-12) -> Any:
        """Channel L2 normalisation times a per-channel ``gamma`` (weight kind ``l2scale``), in
        the current scope: Sum (of Square), Rsqrt (of Maximum), mul."""
        tf = self.tf
        sq = tf.reduce_sum(tf.square(x), axis=3, keepdims=True, name="Sum")
        inv = tf.math.rsqrt(tf.maximum(sq, eps), name="Rsqrt")
        gamma = self.var("gamma", (int(x.shape[-1]),), "l2scale")
        return tf.multiply(x * inv, gamma, name="mul")

    def tensor(self, x: Any) -> Any:
        """``x`` as a plain tensor (the BFP builder finishes a pending matrix op here)."""
        return x


class _Lookup:
    """A plain dict holder that Keras does not track (its variables are tracked by the layer)."""

    def __init__(self, d: Dict[str, Any]) -> None:
        self.d = d


_SPEC_CACHE: Dict[type, Tuple[Tuple[WeightSpec, ...], Tuple[WeightSpec, ...]]] = {}


class AccelModel:
    """Base class of the zoo models (seed: ``azureml.accel.models.accel_model.AccelModel``).

    Subclasses set the class attributes below and implement ``_forward`` (and ``_head`` for
    classifier backbones).

    Constructor: ``(model_base_path, is_frozen=False, custom_weights_directory=None, *,
    weights=None, format=..., weight_format=None, vector_precision=None)``. ``format``: the
    ``Quantized*`` classes' BFP format (default ``"msfp16"``; ``None``/``"fp32"`` builds the
    float graph; a float class accepts only those), ``weight_format`` and ``vector_precision``
    as in ``bfpaccel.compile`` (compile the converted model with the same ones).

    Example:
        >>> from bfpaccel.models import Resnet50
        >>> m = Resnet50("/tmp/models", weights="random")
        >>> m.model_ref, m.version, m.model_path.endswith("rn50/1.1.3")
        ('resnet50', '1.1.3', True)
    """

    _model_folder: str = ""
    _version: str = ""
    _save_name: str = ""
    _prefix: str = ""  # the seed's variable prefix, e.g. "resnet_v1_50/"; DenseNet has no slash
    _input_size: int = 224
    _input_std: float = 60.0  # std of the preprocessed pixels, for the synthetic first layer
    _keras_app: Optional[str] = None  # keras.applications constructor name
    _classifier_input: Optional[str] = None
    _classifier_output: Optional[str] = None
    _output_dims: Tuple[Tuple[Optional[int], ...], ...] = ()
    #: True for the ``Quantized*`` classes: their ``import_graph_def`` graph computes what the
    #: accelerator computes (``format=``, default msfp16: BFP convolutions and dense layers,
    #: vector ops at the plan's vector precision, batch norm folded as the compiler folds it --
    #: bit for bit the compiled plan of the float graph), with the float model's variable names
    #: and seed tensor names; ``format=None`` builds the float graph.
    quantized: bool = False

    def __init__(self, model_base_path: str, is_frozen: bool = False,
                 custom_weights_directory: Optional[str] = None, *, weights: Optional[str] = None,
                 format: Any = _DEFAULT_FORMAT, weight_format: Any = None,
                 vector_precision: Optional[str] = None) -> None:
        if not isinstance(model_base_path, (str, os.PathLike)):
            raise TypeError(f"model_base_path must be a path, got {type(model_base_path).__name__}")
        self._model_base_path = os.fspath(model_base_path)
        self._model_dir = os.path.join(self._model_base_path, self._model_folder, self._version)
        self._checkpoint_dir = (os.fspath(custom_weights_directory) if custom_weights_directory is not None
                                else self._model_dir)
        self._is_frozen = bool(is_frozen)
        self._input_tensor_list: List[str] = ["InputImage:0"]  # per instance (seed: shared class list)
        self._output_tensor_list: List[str] = [FEATURE_TENSOR_NAME]
        self._saver: Any = None
        self._variables: List[Any] = []
        self._specs: List[WeightSpec] = []
        self._weights_source, self._h5_path = self._resolve_weights(weights)
        self._format, self._weight_format, self._vector_precision = self._resolve_format(
            format, weight_format, vector_precision)

    def _resolve_format(self, format: Any, weight_format: Any, vector_precision: Optional[str]) -> Tuple[Any, Any, str]:
        from ..tf._numerics import check_vector_precision, resolve_formats  # numpy + the C++ core only

        if format is _DEFAULT_FORMAT:
            format = "msfp16" if self.quantized else None
        fa, _ = resolve_formats(format, weight_format)
        if fa is not None and not self.quantized:
            raise ValueError(f"{type(self).__name__} is a float model; use Quantized{type(self).__name__} for "
                             f"format={format!r}")
        return fa, (weight_format if fa is not None else None), check_vector_precision(vector_precision, fa)

    @property
    def format(self) -> Any:
        """The BFP format of the graph's matrix ops (a :class:`bfpaccel.Format`), or ``None`` for
        the float graph."""
        return self._format

    @property
    def vector_precision(self) -> str:
        """The vector precision of the graph's vector ops (``fp16`` by default with a format)."""
        return self._vector_precision

    def _builder(self, getter: Getter) -> "GraphBuilder":
        """The layer helpers of this model's graph: float ops, or the BFP ops with a format."""
        if self._format is None:
            return GraphBuilder(getter)
        from ._bfp_builder import BfpGraphBuilder

        return BfpGraphBuilder(getter, self._format, self._weight_format, self._vector_precision)

    # ----- weight sources ---------------------------------------------------------------
    def _expected_files(self) -> str:
        return (f"a TF checkpoint in {self._checkpoint_dir!r} (a 'checkpoint' state file plus "
                f"'{self._save_name}.index' and '{self._save_name}.data-00000-of-00001', as written by "
                f"save_weights(os.path.join(dir, '{self._save_name}'), sess))")

    def _resolve_weights(self, weights: Optional[str]) -> Tuple[str, Optional[str]]:
        if weights is None:
            if find_checkpoint_files(self._checkpoint_dir):
                return "store", None
            head = ""
            if self._head_name_for_errors():
                head = (f", and for get_default_classifier '{self._classifier_pb_path()}' "
                        f"(write it with save_classifier())")
            raise FileNotFoundError(
                f"{type(self).__name__}: no weights found. Expected {self._expected_files()}{head}. "
                f"Options: put the files there; pass custom_weights_directory=<dir with a checkpoint>; "
                f"pass weights='random' for deterministic synthetic weights (tests, benchmarks); "
                f"or weights='<file>.h5' for Keras-applications ImageNet weights"
                f"{' (' + self._keras_app + ')' if self._keras_app else ' (not available for this model)'}. "
                f"Nothing is downloaded.")
        if not isinstance(weights, (str, os.PathLike)):
            raise TypeError(f"weights must be None, 'random' or a .h5 path, got {type(weights).__name__}")
        weights = os.fspath(weights)
        if weights == "random":
            return "random", None
        if weights.endswith(".h5"):
            if self._keras_app is None:
                raise ValueError(f"{type(self).__name__} has no Keras-applications counterpart, so it cannot "
                                 "load .h5 weights; use weights='random' or a checkpoint store")
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"Keras weights file {weights!r} does not exist")
            return "h5", weights
        raise ValueError(f"weights must be None (local store), 'random' or a path ending in '.h5', got {weights!r}")

    def _head_name_for_errors(self) -> bool:
        return self._classifier_output is not None

    def _classifier_pb_path(self) -> str:
        return os.path.join(self._model_dir, f"{self._save_name}_classifier.pb")

    @classmethod
    def _trace_specs(cls, head_only: bool) -> Tuple[WeightSpec, ...]:
        import tensorflow as tf

        specs: List[WeightSpec] = []

        def get(spec: WeightSpec) -> Any:
            specs.append(spec)
            return tf.zeros(spec.shape)

        with tf.Graph().as_default():
            if head_only:
                x = tf.compat.v1.placeholder(tf.float32, cls._output_dims[0])
                cls._head(GraphBuilder(get), x)
            else:
                x = tf.compat.v1.placeholder(tf.float32, [None, cls._input_size, cls._input_size, 3])
                cls._forward(GraphBuilder(get), x)
        return tuple(specs)

    @classmethod
    def _all_specs(cls) -> Tuple[Tuple[WeightSpec, ...], Tuple[WeightSpec, ...]]:
        """(backbone specs, head specs), by tracing the architecture in a scratch graph (cached)."""
        if cls not in _SPEC_CACHE:
            head = cls._trace_specs(True) if cls._classifier_output is not None else ()
            _SPEC_CACHE[cls] = (cls._trace_specs(False), head)
        return _SPEC_CACHE[cls]

    @classmethod
    def _head_specs(cls) -> Tuple[WeightSpec, ...]:
        if cls in _SPEC_CACHE:
            return _SPEC_CACHE[cls][1]
        return cls._trace_specs(True)

    def _arrays(self, specs: Sequence[WeightSpec], source: str, h5: Optional[str]) -> Dict[str, np.ndarray]:
        if source == "random":
            return random_arrays(specs, self._input_std)
        if source == "h5" and h5 is not None:
            return arrays_from_keras_layers(specs, read_keras_h5(h5, self._keras_app), repr(h5))
        return read_checkpoint(self._checkpoint_dir, [s.name for s in specs])

    def weight_arrays(self, include_classifier: bool = True, weights: Optional[str] = None) -> Dict[str, np.ndarray]:
        """All weights as ``{tf_variable_name: float32 array}`` from this model's weight source
        (or from ``weights`` when given: ``"random"`` or a ``.h5`` path).

        Example:
            >>> from bfpaccel.models import Resnet50
            >>> w = Resnet50("/tmp/m", weights="random").weight_arrays()  # doctest: +SKIP
            >>> w["resnet_v1_50/conv1/weights"].shape  # doctest: +SKIP
            (7, 7, 3, 64)
        """
        source, h5 = (self._weights_source, self._h5_path) if weights is None else self._resolve_weights(weights)
        body, head = self._all_specs()
        if source == "store":
            out = self._arrays(body, source, h5)
            if include_classifier and head:
                out.update(self._read_classifier_pb([s.name for s in head]))
            return out
        return self._arrays(list(body) + (list(head) if include_classifier else []), source, h5)

    def _find_classifier_pb(self) -> str:
        candidates = [os.path.join(self._checkpoint_dir, f"{self._save_name}_classifier.pb"),
                      self._classifier_pb_path(),
                      os.path.join(self._model_dir, self._model_folder, self._version,
                                   f"{self._save_name}_classifier.pb")]  # the seed's doubled path
        for c in candidates:
            if os.path.isfile(c):
                return c
        raise FileNotFoundError(
            f"{type(self).__name__}: no default classifier in the local store; expected "
            f"{candidates[1]!r} (a frozen GraphDef; write it with save_classifier()). Or construct the model "
            f"with weights='random' or weights='<keras>.h5'. Nothing is downloaded.")

    def _read_classifier_pb(self, names: Sequence[str]) -> Dict[str, np.ndarray]:
        import tensorflow as tf

        gd = tf.compat.v1.GraphDef()
        with open(self._find_classifier_pb(), "rb") as f:
            gd.ParseFromString(f.read())
        consts = {n.name: tf.make_ndarray(n.attr["value"].tensor) for n in gd.node if n.op == "Const"}
        return {n: np.asarray(consts[n], np.float32) for n in names}

    # ----- architecture hooks -------------------------------------------------------------
    @classmethod
    def _forward(cls, b: GraphBuilder, x: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def _head(cls, b: GraphBuilder, feature: Any) -> Any:
        raise DoesNotExistError(f"{cls.__name__} has no default classifier")

    # ----- TF1 graph --------------------------------------------------------------------
    def _check_input(self, input_tensor: Any) -> Any:
        import tensorflow as tf

        if not isinstance(input_tensor, tf.Tensor) or not hasattr(input_tensor, "graph"):
            raise TypeError(f"input_tensor must be a graph-mode tf.Tensor (use tf.compat.v1 graph mode), "
                            f"got {type(input_tensor).__name__}")
        s = self._input_size
        want = f"[N,{s},{s},3] float32"
        if input_tensor.dtype != tf.float32:
            raise ValueError(f"input_tensor {input_tensor.name} has dtype {input_tensor.dtype.name}, expected {want}"
                             " (e.g. the output of bfpaccel.models.preprocess_array)")
        shape = input_tensor.shape
        if shape.rank is not None and shape.rank != 4:
            raise ValueError(f"input_tensor {input_tensor.name} has rank {shape.rank}, expected {want}")
        dims = shape.as_list() if shape.rank is not None else [None] * 4
        for got, exp, what in ((dims[1], s, "height"), (dims[2], s, "width"), (dims[3], 3, "channels")):
            if got is not None and got != exp:
                raise ValueError(f"input_tensor {input_tensor.name} has {what} {got}, expected {want}")
        if None in dims[1:]:
            input_tensor = tf.identity(input_tensor)
            input_tensor.set_shape([dims[0], s, s, 3])
        return input_tensor

    def import_graph_def(self, input_tensor: Any, is_training: bool = False) -> Union[Any, List[Any]]:
        """Build the network on ``input_tensor`` ([N,224,224,3] float32, 300 for SSD) in the
        default TF1 graph; returns the feature tensor ``brainwave_target_node_1_Version_0.1:0``
        (SSD: the list of 12 box tensors). Variables are created under the model prefix with
        zero/one initial values: call ``restore_weights(sess)`` to load the weights.

        Example:
            >>> import tensorflow.compat.v1 as tf  # doctest: +SKIP
            >>> with tf.Graph().as_default():  # doctest: +SKIP
            ...     x = tf.placeholder(tf.float32, [None, 224, 224, 3])
            ...     feat = Resnet50("/tmp/m", weights="random").import_graph_def(x)
        """
        import tensorflow as tf

        tf1 = tf.compat.v1
        x = self._check_input(input_tensor)
        graph = x.graph
        with graph.as_default():
            tf1.placeholder_with_default(bool(is_training), (), "is_training")
            specs: List[WeightSpec] = []
            variables: List[Any] = []

            def get(spec: WeightSpec):
                init = tf1.ones_initializer() if spec.kind in ("gamma", "gamma_last", "var") else tf1.zeros_initializer()
                v = tf1.get_variable(spec.name, spec.shape, tf.float32, initializer=init)
                specs.append(spec)
                variables.append(v)
                return v

            with tf1.variable_scope(tf1.VariableScope(tf1.AUTO_REUSE, name="")), graph.name_scope(None):
                out = self._forward(self._builder(get), x)
                if isinstance(out, list):
                    outputs = out
                else:
                    outputs = [tf.identity(out, name=FEATURE_TENSOR_NAME.split(":")[0])]
            self._specs, self._variables = specs, variables
            self._saver = tf1.train.Saver(var_list={v.name.split(":")[0]: v for v in variables},
                                          max_to_keep=None)
            if self._is_frozen:
                ref = tf1.get_collection_ref(tf1.GraphKeys.TRAINABLE_VARIABLES)
                mine = {id(v) for v in variables}
                ref[:] = [v for v in ref if id(v) not in mine]
        self._input_tensor_list = [input_tensor.name]
        self._output_tensor_list = [t.name for t in outputs]
        return outputs if len(outputs) > 1 else outputs[0]

    def _require_graph(self) -> None:
        if self._saver is None:
            raise RuntimeError(f"{type(self).__name__}: call import_graph_def(input_tensor) first")

    def restore_weights(self, sess: Any = None) -> None:
        """Load the weights into the variables of ``import_graph_def``: Saver.restore from
        ``tf.compat.v1.train.latest_checkpoint(checkpoint_dir)`` for the store, else the
        synthetic or ``.h5`` arrays (one ``session.run``).

        Example:
            >>> with tf.Session() as sess: model.restore_weights(sess)  # doctest: +SKIP
        """
        import tensorflow.compat.v1 as tf

        self._require_graph()
        sess = sess or tf.get_default_session()
        if sess is None:
            raise ValueError("restore_weights needs a session (argument or tf.compat.v1 default session)")
        if self._weights_source == "store":
            with sess.graph.as_default():  # Saver ops run in graph mode even when called eagerly
                self._saver.restore(sess, latest_checkpoint(self._checkpoint_dir))
            return
        arrays = self._arrays(self._specs, self._weights_source, self._h5_path)
        inits = [v.initializer for v in self._variables]
        feed = {v.initializer.inputs[1]: arrays[s.name] for s, v in zip(self._specs, self._variables)}
        sess.run(inits, feed_dict=feed)

    def save_weights(self, path: str, sess: Any = None) -> str:
        """Save the model's variables as a TF checkpoint with prefix ``path`` (no metagraph,
        as the seed); a store written with ``path = {model_dir}/{save_name}`` is found by the
        constructor. Returns the checkpoint prefix.

        Example:
            >>> model.save_weights("/tmp/m/rn50/1.1.3/resnet50", sess)  # doctest: +SKIP
        """
        import tensorflow.compat.v1 as tf

        self._require_graph()
        sess = sess or tf.get_default_session()
        if sess is None:
            raise ValueError("save_weights needs a session (argument or tf.compat.v1 default session)")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with sess.graph.as_default():  # Saver ops run in graph mode even when called eagerly
            return self._saver.save(sess, path, write_meta_graph=False)

    # ----- default classifier --------------------------------------------------------------
    def _classifier_graph_def(self) -> Any:
        import tensorflow as tf

        if self._classifier_output is None or self._classifier_input is None:
            raise DoesNotExistError(f"{type(self).__name__} has no default classifier")
        if self._weights_source == "store":
            gd = tf.compat.v1.GraphDef()
            with open(self._find_classifier_pb(), "rb") as f:
                gd.ParseFromString(f.read())
            return gd
        arrays = self._arrays(self._head_specs(), self._weights_source, self._h5_path)
        g = tf.Graph()
        with g.as_default():
            feat_dim = self._output_dims[0][-1]
            input_name = self._classifier_input.split(":")[0]
            x = tf.compat.v1.placeholder(tf.float32, [None, 1, 1, feat_dim], name=input_name)
            self._head(GraphBuilder(lambda s: tf.constant(arrays[s.name], name=s.name.split("/")[-1])), x)
        return g.as_graph_def()

    def save_classifier(self, path: Optional[str] = None) -> str:
        """Write the default classifier as a frozen GraphDef (the store's
        ``{save_name}_classifier.pb``, default ``{model_dir}/{save_name}_classifier.pb``).

        Example:
            >>> Resnet50("/tmp/m", weights="random").save_classifier()  # doctest: +SKIP
            '/tmp/m/rn50/1.1.3/resnet50_classifier.pb'
        """
        path = path or self._classifier_pb_path()
        gd = self._classifier_graph_def()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(gd.SerializeToString())
        return path

    def get_default_classifier(self, feature_tensor: Any, prefix: str = "classifier") -> Any:
        """Attach the ImageNet head to ``feature_tensor`` under name scope ``prefix`` and
        return its output (softmax; VGG-16: logits ``classifier/vgg_16/fc8/squeezed:0``). TF
        uniquifies an existing scope to ``classifier_1``, as the seed. SSD raises
        :class:`DoesNotExistError`.

        Example:
            >>> out = model.get_default_classifier(feat)  # doctest: +SKIP
            >>> out.name  # doctest: +SKIP
            'classifier/resnet_v1_50/predictions/Softmax:0'
        """
        import tensorflow.compat.v1 as tf

        if self._format is not None:
            return self._bfp_classifier(feature_tensor, prefix)
        gd = self._classifier_graph_def()
        with feature_tensor.graph.as_default():
            (out,) = tf.import_graph_def(gd, input_map={self._classifier_input: feature_tensor},
                                         return_elements=[self._classifier_output], name=prefix)
        return out

    def _bfp_classifier(self, feature_tensor: Any, prefix: str) -> Any:
        """The default classifier built with the BFP ops in ``feature_tensor``'s graph under
        the (uniquified) scope ``prefix``, with its weights as constants -- the names of the
        imported frozen classifier (``{prefix}/{classifier input}``, ``{prefix}/.../Softmax``)."""
        import tensorflow as tf

        if self._classifier_output is None or self._classifier_input is None:
            raise DoesNotExistError(f"{type(self).__name__} has no default classifier")
        specs = self._head_specs()
        if self._weights_source == "store":
            arrays = self._read_classifier_pb([s.name for s in specs])
        else:
            arrays = self._arrays(specs, self._weights_source, self._h5_path)
        graph = feature_tensor.graph
        with graph.as_default():
            with graph.name_scope(prefix) as scope:
                base = scope.rstrip("/")
            b = self._builder(lambda s: tf.constant(arrays[s.name], name=s.name.split("/")[-1]))
            b.base = base  # type: ignore[attr-defined]
            with graph.name_scope(base + "/"):
                x = tf.identity(feature_tensor, name=self._classifier_input.split(":")[0])
            with graph.name_scope(None):
                out = b.tensor(self._head(b, x))
        return out

    # ----- Keras 3 / SavedModel ---------------------------------------------------------
    def keras_model(self, weights: Optional[str] = None, include_classifier: bool = True) -> Any:
        """A Keras 3 functional model of the same network and weights: input ``images``
        float32 [N,224,224,3] (300 for SSD), output the classifier output (or the
        [N,1,1,C] feature with ``include_classifier=False``; SSD: the 12 box tensors).

        Example:
            >>> km = Resnet50("/tmp/m", weights="random").keras_model()  # doctest: +SKIP
            >>> km(np.zeros((1, 224, 224, 3), np.float32)).shape  # doctest: +SKIP
            TensorShape([1, 1000])
        """
        import keras

        with_head = include_classifier and self._classifier_output is not None
        arrays = self.weight_arrays(include_classifier=with_head, weights=weights)
        model_cls = type(self)

        class AccelNetwork(keras.layers.Layer):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                lookup = {}
                for name, arr in arrays.items():
                    v = self.add_weight(shape=arr.shape, initializer="zeros", name=name.replace("/", "__"),
                                        dtype="float32")
                    v.assign(arr)
                    lookup[name] = v
                self._lookup = _Lookup(lookup)

            def call(self, x: Any) -> Any:
                b = GraphBuilder(lambda s: self._lookup.d[s.name].value)
                out = model_cls._forward(b, x)
                if with_head:
                    out = model_cls._head(b, out)
                return out

        s = self._input_size
        inp = keras.Input((s, s, 3), name="images", dtype="float32")
        out = AccelNetwork(name=self._save_name)(inp)
        return keras.Model(inp, out, name=self._save_name)

    def export_saved_model(self, path: str, weights: Optional[str] = None, include_classifier: bool = True) -> str:
        """Write a TF2 SavedModel of ``keras_model(...)`` with a ``serving_default`` signature
        (input ``images``). Returns ``path``.

        Example:
            >>> Resnet50("/tmp/m", weights="random").export_saved_model("/tmp/rn50_sm")  # doctest: +SKIP
        """
        self.keras_model(weights=weights, include_classifier=include_classifier).export(path, format="tf_saved_model",
                                                                                         verbose=False)
        return path

    # ----- properties (seed API) ------------------------------------------------------
    @property
    def model_ref(self) -> str:
        """The model's save name (``resnet50``, ``vgg16``, ...)."""
        return self._save_name

    @property
    def model_version(self) -> str:
        """The model version string, e.g. ``"1.1.3"``."""
        return self._version

    @property
    def version(self) -> str:
        """Same as ``model_version``."""
        return self._version

    @property
    def model_path(self) -> str:
        """``{model_base_path}/{folder}/{version}``."""
        return self._model_dir

    @property
    def input_tensor_list(self) -> List[str]:
        """Input tensor names (``['InputImage:0']`` until ``import_graph_def``)."""
        return list(self._input_tensor_list)

    @property
    def output_tensor_list(self) -> List[str]:
        """Output tensor names (the feature tensor; SSD: its 12 tensors after import)."""
        return list(self._output_tensor_list)

    def get_input_dims(self, index: int) -> Tuple[Optional[int], ...]:
        """Shape of input ``index``: ``(None, 224, 224, 3)`` (300 for SSD)."""
        if index != 0:
            raise IndexError(f"{type(self).__name__} has 1 input, index {index} is out of range")
        return (None, self._input_size, self._input_size, 3)

    def get_output_dims(self, index: int) -> Tuple[Optional[int], ...]:
        """Shape of output ``index`` (batch dimension ``None``)."""
        if not 0 <= index < len(self._output_dims):
            raise IndexError(f"{type(self).__name__} has {len(self._output_dims)} outputs, index {index} is out of range")
        return self._output_dims[index]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model_path={self._model_dir!r}, version={self._version!r}, "
                f"weights={self._weights_source!r})")
