"""The backends ``bfpaccel bench`` compares, each behind the same three steps:
``prepare(ctx)`` (compile, build sessions, start servers: not timed), ``bind(x)`` (a zero-argument
callable that runs the model once on the batch ``x``: this is what is timed) and ``close()``.

A backend that cannot run on this machine raises :class:`Unavailable` with a plain reason
("no NVIDIA GPU ...", "TensorFlow runs the zoo models only"); the harness records it and goes on.

Backend names (``parse_backends``):

=========================  ===================================================================
``bfp:FORMAT``             ``bfpaccel.compile(onnx, format=FORMAT)`` + ``bfpaccel.Session`` (with the
                           run's threads and kernel as session options); after the timed runs,
                           one ``Session.profile_summary`` gives the GEMM kernel's share
``onnxruntime``            onnxruntime float32 on the CPU (the reference of every ratio)
``onnxruntime-int8``       onnxruntime's static int8 model (QDQ, QUInt8 activations, QInt8
                           per-channel weights), calibrated on a few inputs
``tensorflow``             the zoo model's Keras 3 model (same seeded weights), ``tf.function``,
                           CPU float32; a PATH.onnx is unavailable (TF cannot run the ONNX)
``cuda``                   onnxruntime's CUDAExecutionProvider, else TensorFlow on a GPU (zoo
                           models), else the ONNX on PyTorch's CUDA device through onnx2torch
                           (numpy in, numpy out: the host<->device copies are in the time)
``fpga-model[:NPU]``       ``bfpaccel.perfmodel.estimate`` (an estimate, not a measurement;
                           default NPU ``brainwave-s10``)
``serving[:FORMAT][:jpeg]`` end-to-end gRPC Predict on loopback against an in-process
                           ``bfpaccel serve`` of the BFP plan (default format: the first
                           ``bfp:`` backend's, else msfp16); ``jpeg``: send encoded JPEGs
                           (needs a plan with an image front) instead of the float tensor
=========================  ===================================================================

Example:
    >>> [b.name for b in parse_backends("bfp:msfp16,onnxruntime")]
    ['bfp:msfp16', 'onnxruntime']
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Unavailable", "BenchArgumentError", "BenchContext", "Backend", "parse_backends", "BACKEND_HELP",
           "DEFAULT_BACKENDS", "REFERENCE_BACKEND", "ort_cuda_session", "onnxruntime_cuda_reason",
           "tensorflow_gpu_reason", "nvidia_gpu_reason", "torch_cuda_reason", "torch_module_from_onnx"]

#: Every backend, as ``bfpaccel bench`` runs them by default.
DEFAULT_BACKENDS = "bfp:msfp16,bfp:msfp12,onnxruntime,onnxruntime-int8,tensorflow,cuda,fpga-model,serving"
#: The backend every ratio is taken against.
REFERENCE_BACKEND = "onnxruntime"
BACKEND_HELP = ("bfp:FORMAT, onnxruntime, onnxruntime-int8, tensorflow, cuda, fpga-model[:NPU], "
                "serving[:FORMAT][:jpeg]")
DEFAULT_NPU = "brainwave-s10"


class Unavailable(Exception):
    """The backend cannot run on this machine; ``str(exc)`` is the reason, in plain words."""


class BenchArgumentError(ValueError):
    """A bad argument of the benchmark (unknown backend, batch 0, ...): the CLI exits with 2."""


@dataclass
class BenchContext:
    """What every backend of one benchmark run shares: the model, its input, threads (and the
    BFP kernel; ``None``: the process default), a work folder, and the compiled BFP plans
    (compiled once per format, shared by ``bfp:`` and ``serving``)."""

    onnx_path: str
    model: str
    zoo_name: Optional[str]
    input_name: str
    output_names: List[str]
    threads: int
    workdir: str
    cache_dir: Optional[str] = None
    is_cached_model: bool = False
    batches: Tuple[int, ...] = (1,)
    sample_shape: Tuple[int, ...] = ()
    seed: int = 0
    metadata: Dict[str, str] = field(default_factory=dict)
    log: Callable[[str], None] = print
    kernel: Optional[str] = None
    #: text encoders (bfpaccel.models.text): the sequence length of the token-id inputs; None: a
    #: model of one float input
    seq_len: Optional[int] = None
    _plans: Dict[str, Any] = field(default_factory=dict)

    def plan(self, fmt: str) -> Any:
        """The model compiled for ``fmt`` (compiled on first use)."""
        if fmt not in self._plans:
            import bfpaccel

            self.log(f"compiling {os.path.basename(self.onnx_path)} for {fmt}")
            self._plans[fmt] = bfpaccel.compile(self.onnx_path, format=fmt)
        return self._plans[fmt]

    def make_input(self, batch: int, seed: int) -> Any:
        """A seeded float32 input batch of the model's shape; the seed's mean-subtracted RGB
        pixels (zoo models) get pixel-sized values, anything else unit normal ones. A text
        encoder gets feeds: ``input_ids`` (``[CLS]``, seeded word-piece ids, ``[SEP]``) and an
        all-ones ``attention_mask``, int64 ``[batch, seq_len]``."""
        rng = np.random.default_rng(seed)
        if self.seq_len is not None:
            ids = rng.integers(1999, 30000, (batch, self.seq_len), dtype=np.int64)
            ids[:, 0], ids[:, -1] = 101, 102
            return {"input_ids": ids, "attention_mask": np.ones((batch, self.seq_len), np.int64)}
        scale = 50.0 if '"kind": "image"' in self.metadata.get("bfpaccel.preprocess", "") else 1.0
        return (rng.standard_normal((batch, *self.sample_shape)) * scale).astype(np.float32)


class Backend:
    """One way of running the model.  Subclasses set ``name`` (the spec, e.g. ``bfp:msfp16``)
    and ``label`` (for tables), and implement ``prepare`` and ``bind`` (``estimate_ms`` for an
    estimate).  ``info`` collects what the JSON should record (provider, format, ...)."""

    kind = "measured"  # or "estimate"

    def __init__(self, name: str, label: str) -> None:
        self.name = name
        self.label = label
        self.info: Dict[str, Any] = {}

    def prepare(self, ctx: BenchContext) -> None:
        """Everything before the first run (not timed).  Raises :class:`Unavailable`."""

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        """A callable that runs the model once on ``x`` (what is timed)."""
        raise NotImplementedError

    def output(self, result: Any, ctx: BenchContext) -> Optional[np.ndarray]:
        """The model's first output out of one call's result (to check backends agree)."""
        return None

    def estimate_ms(self, batch: int) -> Tuple[float, Dict[str, Any]]:
        """Estimated latency of one batch, and details (estimate backends only)."""
        raise NotImplementedError

    def profile(self, x: np.ndarray) -> Optional[Dict[str, Any]]:
        """Where the time of one call on ``x`` goes (after the timed runs, not timed itself):
        a dict with at least ``kernel_share``, or None for a backend that cannot tell."""
        return None

    def close(self) -> None:
        """Free what ``prepare`` started (servers, sessions)."""


# ----- onnxruntime ---------------------------------------------------------------------
def _feeds(x: Any, input_name: str) -> Dict[str, np.ndarray]:
    """A run's feeds: ``x`` itself when it is already name -> array (text encoders), else the
    model's one input."""
    return dict(x) if isinstance(x, dict) else {input_name: x}


def _first_output(result: List[Any], out_names: List[str], ctx: BenchContext) -> np.ndarray:
    """The model's first output (ctx.output_names[0]) out of a list in the graph's output order."""
    name = ctx.output_names[0]
    return np.asarray(result[out_names.index(name)] if name in out_names else result[0])


def _single_input_only(ctx: BenchContext, what: str) -> None:
    if ctx.seq_len is not None:
        raise Unavailable(f"{what} runs models of one float input; this text encoder takes token ids and a mask")


class _OrtRun:
    """Runs an onnxruntime session (``use(sess)`` first): bind, the first output, close -- the CPU
    backends' and the CUDA provider's alike."""

    def use(self, sess: Any) -> None:
        self.sess = sess
        self.input_name = sess.get_inputs()[0].name
        self.out_names = [o.name for o in sess.get_outputs()]

    def bind(self, x: Any) -> Callable[[], Any]:
        sess, feeds = self.sess, _feeds(x, self.input_name)
        return lambda: sess.run(None, feeds)

    def output(self, result: Any, ctx: BenchContext) -> Optional[np.ndarray]:
        return _first_output(result, self.out_names, ctx)

    def close(self) -> None:
        self.sess = None


class OnnxruntimeBackend(_OrtRun, Backend):
    def __init__(self) -> None:
        super().__init__("onnxruntime", "onnxruntime fp32")

    def _session_path(self, ctx: BenchContext) -> str:
        return ctx.onnx_path

    def prepare(self, ctx: BenchContext) -> None:
        if importlib.util.find_spec("onnxruntime") is None:
            raise Unavailable("onnxruntime is not installed (pip install onnxruntime)")
        import onnxruntime

        from ..baselines import ort_session

        self.use(ort_session(self._session_path(ctx), ctx.threads))
        self.info.update(provider="CPUExecutionProvider", onnxruntime=onnxruntime.__version__)


class OnnxruntimeInt8Backend(OnnxruntimeBackend):
    CALIBRATION_INPUTS = 4

    def __init__(self) -> None:
        Backend.__init__(self, "onnxruntime-int8", "onnxruntime int8 (QDQ U8S8)")

    def _session_path(self, ctx: BenchContext) -> str:
        from ..baselines import ort_int8_dynamic_model, ort_int8_model

        if ctx.seq_len is not None:  # a transformer: onnxruntime's dynamic int8 (its path for encoders)
            q = os.path.join(ctx.workdir, os.path.basename(ctx.onnx_path)[:-5] + ".int8-dynamic.onnx")
            self.label = "onnxruntime int8 (dynamic U8S8)"
            self.info.update(quantization="dynamic: weights QInt8 per channel, activations QUInt8 per call",
                             int8_model=q)
            ctx.log(f"quantizing {os.path.basename(ctx.onnx_path)} to int8 with onnxruntime (dynamic)")
            return ort_int8_dynamic_model(ctx.onnx_path, q)

        # zoo models: kept beside the cached float model (quantizing ResNet-50 takes ~1 min);
        # a user's PATH.onnx: in the run's work folder, so nothing is written next to it
        if ctx.is_cached_model:
            q = ctx.onnx_path[:-5] + ".int8.onnx"
        else:
            q = os.path.join(ctx.workdir, os.path.basename(ctx.onnx_path)[:-5] + ".int8.onnx")
        fresh = os.path.isfile(q) and os.path.getmtime(q) >= os.path.getmtime(ctx.onnx_path)
        self.info.update(quantization="static QDQ, activations QUInt8, weights QInt8 per channel, MinMax",
                         calibration_inputs=self.CALIBRATION_INPUTS, int8_model=q, reused=fresh)
        if not fresh:
            ctx.log(f"quantizing {os.path.basename(ctx.onnx_path)} to int8 with onnxruntime "
                    f"({self.CALIBRATION_INPUTS} calibration inputs)")
            calib = [ctx.make_input(1, ctx.seed + 1000 + i) for i in range(self.CALIBRATION_INPUTS)]
            ort_int8_model(ctx.onnx_path, q, calib)
        return q


# ----- bfpaccel ------------------------------------------------------------------------
class BfpBackend(Backend):
    #: profiled runs behind the kernel share (the fastest is kept)
    PROFILE_RUNS = 3

    def __init__(self, fmt: str) -> None:
        super().__init__(f"bfp:{fmt}", f"bfpaccel {fmt}")
        self.fmt = fmt

    def prepare(self, ctx: BenchContext) -> None:
        import bfpaccel

        plan = ctx.plan(self.fmt)
        # the run's options belong to this session: the process defaults stay as they are
        self.sess: Any = bfpaccel.Session(plan, num_threads=ctx.threads, kernel=ctx.kernel)
        self.input_name = plan.input_names[0]
        self.info.update(format=self.fmt, vector_precision=plan.vector_precision, kernel=self.sess.kernel,
                         threads=self.sess.num_threads)

    def profile(self, x: Any) -> Optional[Dict[str, Any]]:
        s = self.sess.profile_summary(_feeds(x, self.input_name), runs=self.PROFILE_RUNS, top=5, warmup=False)
        return s.to_dict()

    def bind(self, x: Any) -> Callable[[], Any]:
        sess, feeds = self.sess, _feeds(x, self.input_name)
        return lambda: sess.run(None, feeds)

    def output(self, result: Any, ctx: BenchContext) -> Optional[np.ndarray]:
        name = ctx.output_names[0]
        return np.asarray(result[name] if name in result else next(iter(result.values())))

    def close(self) -> None:
        self.sess = None


# ----- TensorFlow ----------------------------------------------------------------------
def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _tf_keras_function(ctx: BenchContext, device: str) -> Tuple[Any, Any]:
    """``(tf module, tf.function)`` of the zoo model's Keras model on ``device``."""
    if ctx.zoo_name is None:
        raise Unavailable("TensorFlow runs the zoo models only (it cannot run an ONNX file); "
                          f"{ctx.model!r} is not one")
    from ..models.zoo import ZOO_MODELS

    if ctx.zoo_name not in ZOO_MODELS:
        raise Unavailable(f"TensorFlow runs the TF zoo models only ({', '.join(ZOO_MODELS)}); "
                          f"{ctx.zoo_name} comes from PyTorch")
    if importlib.util.find_spec("tensorflow") is None:
        raise Unavailable("TensorFlow is not installed (pip install 'bfpaccel[tf]')")
    import tensorflow as tf

    try:  # only possible before TensorFlow's runtime has started
        tf.config.threading.set_intra_op_parallelism_threads(ctx.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    from .. import models
    from ..accuracy import _cache_dir

    cls_name = ZOO_MODELS[ctx.zoo_name][0]
    with tf.device(device):
        km = getattr(models, cls_name)(os.path.join(_cache_dir(ctx.cache_dir), "store"), weights="random").keras_model()
        fn = tf.function(lambda t: km(t, training=False), reduce_retracing=True)
    return tf, fn


class TensorflowBackend(Backend):
    def __init__(self) -> None:
        super().__init__("tensorflow", "tensorflow fp32")

    def prepare(self, ctx: BenchContext) -> None:
        _single_input_only(ctx, "the tensorflow backend")
        self.tf, self.fn = _tf_keras_function(ctx, "/CPU:0")
        self.device = "/CPU:0"
        self.info.update(device="CPU", tensorflow=self.tf.__version__,
                         graph="zoo Keras 3 model, same seeded weights, tf.function",
                         intra_op_threads=self.tf.config.threading.get_intra_op_parallelism_threads())

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        tf, fn = self.tf, self.fn
        with tf.device(self.device):
            t = tf.constant(x)

        def run() -> Any:
            with tf.device(self.device):
                out = fn(t)
            return [o.numpy() for o in out] if isinstance(out, (list, tuple)) else out.numpy()
        return run

    def output(self, result: Any, ctx: BenchContext) -> Optional[np.ndarray]:
        return None if isinstance(result, list) else np.asarray(result)

    def close(self) -> None:
        self.fn = None


# ----- CUDA ----------------------------------------------------------------------------
def nvidia_gpu_reason() -> Optional[str]:
    """Why this machine has no NVIDIA GPU device node, or None when ``/dev/nvidia0`` exists."""
    if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/dxg"):
        return None
    return "no NVIDIA GPU on this machine (/dev/nvidia0 does not exist)"


def onnxruntime_cuda_reason() -> Optional[str]:
    """Why onnxruntime cannot use CUDA here, or None when it lists CUDAExecutionProvider."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (the GPU build is the onnxruntime-gpu package)"
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        return None
    return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (it has {', '.join(providers)}; "
            "the GPU build is the onnxruntime-gpu package)")


def ort_cuda_session(onnx_path: str, threads: Optional[int] = None, require_listed: bool = True) -> Any:
    """An onnxruntime session of ``onnx_path`` on CUDAExecutionProvider (device 0).

    onnxruntime silently falls back to the CPU when CUDA cannot start; this raises
    :class:`Unavailable` instead, with the reason.  ``require_listed=False`` skips the check of
    ``get_available_providers()`` and tries to create the session anyway.

    Example:
        >>> sess = ort_cuda_session("model.onnx")  # doctest: +SKIP
    """
    if require_listed:
        reason = onnxruntime_cuda_reason()
        if reason:
            raise Unavailable(reason)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # the fallback is reported below, in words, not as a log line
    providers: List[Any] = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Specified provider ... is not in available provider names"
        try:
            sess = ort.InferenceSession(onnx_path, opts, providers=providers)
        except Exception as e:  # a broken CUDA install raises here (missing libcudart, cuDNN ...)
            raise Unavailable(f"onnxruntime could not start CUDAExecutionProvider: {e}") from None
    got = sess.get_providers()
    if not got or got[0] != "CUDAExecutionProvider":
        gpu = nvidia_gpu_reason()
        raise Unavailable("onnxruntime could not start CUDAExecutionProvider: the session fell back to "
                          f"{', '.join(got) or 'nothing'}" + (f" ({gpu})" if gpu else ""))
    return sess


def tensorflow_gpu_reason(import_tensorflow: bool = True) -> Optional[str]:
    """Why TensorFlow cannot use a GPU here, or None when it lists one.  The CPU-only wheel
    (``tensorflow-cpu``) is recognised from its package metadata, without importing TensorFlow."""
    if importlib.util.find_spec("tensorflow") is None:
        return "TensorFlow is not installed"
    full = _dist_version("tensorflow") or _dist_version("tf-nightly")
    cpu = _dist_version("tensorflow-cpu") or _dist_version("tensorflow_cpu")
    if cpu and not full:
        return f"TensorFlow is the CPU-only build (tensorflow-cpu {cpu})"
    if not import_tensorflow:
        return "TensorFlow was not asked for its GPUs"
    import tensorflow as tf

    if not tf.test.is_built_with_cuda():
        return f"TensorFlow {tf.__version__} is built without CUDA"
    if not tf.config.list_physical_devices("GPU"):
        return f"TensorFlow {tf.__version__} sees no GPU (tf.config.list_physical_devices('GPU') is empty)"
    return None


def torch_cuda_reason() -> Optional[str]:
    """Why the ONNX cannot run on PyTorch's CUDA device here, or None when it can (PyTorch sees a
    CUDA device and onnx2torch, which turns the ONNX into a ``torch.nn.Module``, is installed).
    PyTorch is imported only when onnx2torch is there to use it."""
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed"
    if importlib.util.find_spec("onnx2torch") is None:
        return ("PyTorch is installed but onnx2torch is not (pip install onnx2torch: it runs the ONNX on "
                "PyTorch's CUDA device)")
    import torch

    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (torch.cuda.is_available() is False)"
    return None


def torch_module_from_onnx(onnx_path: str, device: str = "cuda") -> Any:
    """The ONNX model at ``onnx_path`` as a ``torch.nn.Module`` (onnx2torch's ``torch.fx``
    graph of the model after onnxruntime's basic rewrites) in eval mode on ``device``.  Its
    ``forward`` takes the graph's inputs in order.

    Example:
        >>> m = torch_module_from_onnx("model.onnx", "cuda")  # doctest: +SKIP
    """
    try:
        from onnx2torch import convert
    except ImportError as e:  # onnx2torch imports torchvision, whose wheel must match the torch build
        raise Unavailable(f"onnx2torch cannot be imported: {e}") from None
    from ..baselines import ort_basic_optimized

    name = os.path.basename(onnx_path)
    try:
        # onnxruntime's basic rewrites first (what its own sessions start from): the TorchScript
        # exporter's Identity nodes for duplicate initializers and constant chains become plain
        # initializers, which onnx2torch needs for Conv weights
        proto = ort_basic_optimized(onnx_path)
    except Exception as e:
        raise Unavailable(f"onnxruntime cannot load {name} for its basic rewrites: {e}") from None
    try:
        module = convert(proto)
    except Exception as e:  # an op onnx2torch has no converter for, an opset it does not take
        raise Unavailable(f"onnx2torch cannot convert {name}: {e}") from None
    return module.eval().to(device)


def _graph_io_names(onnx_path: str) -> Tuple[List[str], List[str]]:
    """The graph's (inputs without initializers, outputs), in order."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]


class _GpuRuntime:
    """One way the ``cuda`` backend runs the model on an NVIDIA GPU.  ``reason(ctx)`` says why it
    cannot run here (None: it can); then ``prepare(ctx)`` returns what the JSON records, and
    ``bind`` / ``output`` / ``close`` are the backend's."""

    label = "cuda"

    def reason(self, ctx: BenchContext) -> Optional[str]:
        raise NotImplementedError

    def prepare(self, ctx: BenchContext) -> Dict[str, Any]:
        raise NotImplementedError

    def bind(self, x: Any) -> Callable[[], Any]:
        raise NotImplementedError

    def output(self, result: Any, ctx: BenchContext) -> Optional[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _OrtCuda(_OrtRun, _GpuRuntime):
    """onnxruntime's CUDAExecutionProvider (the onnxruntime-gpu package)."""

    label = "cuda (onnxruntime)"

    def reason(self, ctx: BenchContext) -> Optional[str]:
        return onnxruntime_cuda_reason()

    def prepare(self, ctx: BenchContext) -> Dict[str, Any]:
        import onnxruntime

        self.use(ort_cuda_session(ctx.onnx_path, ctx.threads, require_listed=False))
        return dict(runtime="onnxruntime", provider="CUDAExecutionProvider", onnxruntime=onnxruntime.__version__,
                    note="numpy in, numpy out: host<->device copies are in the time")


class _TfGpu(_GpuRuntime):
    """The zoo model's Keras model on TensorFlow's first GPU (TensorFlow cannot run an ONNX)."""

    label = "cuda (tensorflow)"

    def reason(self, ctx: BenchContext) -> Optional[str]:
        r = tensorflow_gpu_reason()
        if r is None and ctx.zoo_name is None:
            return "TensorFlow has a GPU but runs the zoo models only"
        return r

    def prepare(self, ctx: BenchContext) -> Dict[str, Any]:
        self.tf, self.fn = _tf_keras_function(ctx, "/GPU:0")
        return dict(runtime="tensorflow", device="/GPU:0", tensorflow=self.tf.__version__,
                    note="numpy out: the device->host copy is in the time")

    def bind(self, x: Any) -> Callable[[], Any]:
        tf, fn = self.tf, self.fn
        with tf.device("/GPU:0"):
            t = tf.constant(x)

        def run() -> Any:
            out = fn(t)
            return [o.numpy() for o in out] if isinstance(out, (list, tuple)) else out.numpy()
        return run

    def output(self, result: Any, ctx: BenchContext) -> Optional[np.ndarray]:
        return None if isinstance(result, list) else np.asarray(result)

    def close(self) -> None:
        self.fn = None


class _TorchCuda(_GpuRuntime):
    """The ONNX on PyTorch's CUDA device through onnx2torch (after onnxruntime's basic rewrites)."""

    label = "cuda (torch)"
    #: the PyTorch device (tests run this runtime on "cpu")
    device = "cuda"

    def reason(self, ctx: BenchContext) -> Optional[str]:
        return torch_cuda_reason()

    def prepare(self, ctx: BenchContext) -> Dict[str, Any]:
        import torch

        self.torch, dev = torch, self.device
        self.module = torch_module_from_onnx(ctx.onnx_path, dev)
        self.input_names, self.out_names = _graph_io_names(ctx.onnx_path)
        # as onnxruntime's CUDA provider searches cuDNN's convolution algorithms: pick the fastest
        # per shape on first use (the warm-up calls); restored in close()
        self._cudnn_benchmark: Optional[bool] = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        return dict(runtime="torch", device=torch.cuda.get_device_name(0) if dev == "cuda" else dev,
                    torch=torch.__version__, cuda=torch.version.cuda, onnx2torch=_dist_version("onnx2torch"),
                    cudnn_benchmark=True, cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32),
                    matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
                    note="numpy in, numpy out: host<->device copies are in the time")

    def bind(self, x: Any) -> Callable[[], Any]:
        torch, module, dev = self.torch, self.module, self.device
        arrays = [x[n] for n in self.input_names] if isinstance(x, dict) else [x]

        def run() -> Any:
            with torch.inference_mode():
                out = module(*[torch.from_numpy(a).to(dev) for a in arrays])
            outs = out if isinstance(out, (list, tuple)) else [out]
            return [o.cpu().numpy() for o in outs]
        return run

    def output(self, result: Any, ctx: BenchContext) -> Optional[np.ndarray]:
        return _first_output(result, self.out_names, ctx)  # onnx2torch: the graph's outputs in order

    def close(self) -> None:
        if getattr(self, "_cudnn_benchmark", None) is not None:
            self.torch.backends.cudnn.benchmark = self._cudnn_benchmark
            self._cudnn_benchmark = None
        self.module = None


class CudaBackend(Backend):
    """The first of :attr:`runtimes` that can run here; unavailable with every one's reason."""

    runtimes: Tuple[type, ...] = (_OrtCuda, _TfGpu, _TorchCuda)

    def __init__(self) -> None:
        super().__init__("cuda", "cuda")
        self.rt: Optional[_GpuRuntime] = None

    def prepare(self, ctx: BenchContext) -> None:
        reasons: List[str] = []
        for cls in self.runtimes:
            rt = cls()
            reason = rt.reason(ctx)
            if reason:
                reasons.append(reason)
                continue
            self.info.update(rt.prepare(ctx))
            self.rt, self.label = rt, rt.label
            return
        gpu = nvidia_gpu_reason()
        raise Unavailable("; ".join(([gpu] if gpu else []) + reasons))

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        assert self.rt is not None, "prepare() first"
        return self.rt.bind(x)

    def output(self, result: Any, ctx: BenchContext) -> Optional[np.ndarray]:
        return self.rt.output(result, ctx) if self.rt is not None else None

    def close(self) -> None:
        if self.rt is not None:
            self.rt.close()
        self.rt = None


# ----- FPGA performance model ----------------------------------------------------------
def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return repr(v)


class FpgaModelBackend(Backend):
    kind = "estimate"

    def __init__(self, npu: str = DEFAULT_NPU) -> None:
        name = "fpga-model" if npu == DEFAULT_NPU else f"fpga-model:{npu}"
        super().__init__(name, f"fpga-model {npu} (estimate)")
        self.npu = npu

    def prepare(self, ctx: BenchContext) -> None:
        _single_input_only(ctx, "the FPGA performance model (convolution and dense layers)")
        try:
            from .. import perfmodel
        except ImportError as e:
            raise Unavailable(f"the FPGA performance model (bfpaccel.perfmodel) is not available: {e}") from None
        if not hasattr(perfmodel, "estimate"):
            raise Unavailable("bfpaccel.perfmodel has no estimate() in this build")
        self._estimate = perfmodel.estimate
        # a plan the bfp: backends already compiled spares perfmodel compiling the ONNX again
        fmt = "msfp16" if "msfp16" in ctx._plans else next(iter(ctx._plans), None)
        self._model = ctx._plans[fmt] if fmt else ctx.onnx_path
        self.info.update(npu=self.npu, model=f"plan {fmt}" if fmt else "ONNX (perfmodel compiles it for msfp16)",
                         note="modelled latency of the NPU, not measured on this machine")

    def estimate_ms(self, batch: int) -> Tuple[float, Dict[str, Any]]:
        est = self._estimate(self._model, npu=self.npu, batch=batch)
        details: Dict[str, Any] = {}
        util = getattr(est, "utilization", None)
        if util is not None:
            details["utilization"] = _jsonable(util)
        to_json = getattr(est, "to_json", None)
        if callable(to_json):
            try:
                d = to_json()
                d = json.loads(d) if isinstance(d, str) else d
                if isinstance(d, dict):  # the summary; per-layer detail is `bfpaccel estimate`'s job
                    details["estimate"] = {k: _jsonable(v) for k, v in d.items() if k != "layers"}
            except Exception as e:  # the summary is a nicety; the total is what counts
                details["to_json_error"] = f"{type(e).__name__}: {e}"
        layers = getattr(est, "layers", None)
        if layers is not None:
            try:
                details["layers"] = len(layers)
            except TypeError:
                pass
        return float(est.total_ms), details


# ----- serving -------------------------------------------------------------------------
class ServingBackend(Backend):
    def __init__(self, fmt: Optional[str], jpeg: bool) -> None:
        name = "serving" + (f":{fmt}" if fmt else "") + (":jpeg" if jpeg else "")
        super().__init__(name, name)
        self.fmt = fmt
        self.jpeg = jpeg
        self.handle: Any = None
        self.client: Any = None

    def prepare(self, ctx: BenchContext) -> None:
        _single_input_only(ctx, "the serving backend")
        if importlib.util.find_spec("grpc") is None:
            raise Unavailable("grpcio is not installed (pip install grpcio)")
        fmt = self.fmt or "msfp16"
        plan = ctx.plan(fmt)
        pre = json.loads(plan.metadata.get("bfpaccel.preprocess", "null") or "null") or {}
        if self.jpeg:
            if not str(pre.get("kind", "")).startswith("image"):
                raise Unavailable("the model records no image front (bfpaccel.preprocess metadata): "
                                  "JPEG requests need one; use 'serving' (float tensors)")
            self.key = pre.get("input_alias") or pre.get("string_input") or plan.input_names[0]
        else:
            self.key = pre.get("onnx_input") or plan.input_names[0]
        from ..serve.client import PredictionClient
        from ..serve.server import serve

        path = plan.save(os.path.join(ctx.workdir, f"serving-{fmt}.bfpplan"))
        self.handle = serve(path, port=0, host="127.0.0.1", block=False, workers=1, warmup=True,
                            num_threads=ctx.threads, kernel=ctx.kernel, max_batch=max(64, *ctx.batches), reflection=False,
                            health=False)
        if not self.handle.wait_ready(600):
            raise RuntimeError("the server did not finish loading the plan in 600 s")
        self.client = PredictionClient("127.0.0.1", self.handle.port, retry="none")
        self.label = f"serving {fmt} (gRPC, {'JPEG' if self.jpeg else 'float tensor'})"
        self.info.update(format=fmt, transport="gRPC Predict, loopback, server in this process (1 worker)",
                         input="JPEG bytes (decode + preprocessing in the server)" if self.jpeg else
                         "float32 tensor (tensor_content)", port=self.handle.port)

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        client, key = self.client, self.key
        if self.jpeg:
            from ..serve.testing import make_image

            images = [make_image("jpeg", (500, 375), seed=i) for i in range(x.shape[0])]
            return lambda: client.score_images(images, input_name=key, timeout=600.0)
        return lambda: client.predict({key: x}, timeout=600.0)

    def output(self, result: Any, ctx: BenchContext) -> Optional[np.ndarray]:
        if self.jpeg:
            return None  # another input: not comparable
        name = ctx.output_names[0]
        return np.asarray(result[name]) if name in result else None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.handle is not None:
            self.handle.stop(grace=1.0)
            self.handle = None


# ----- parsing -------------------------------------------------------------------------
def _check_format(fmt: str, spec: str) -> str:
    from ..formats import get_format

    try:
        get_format(fmt)
    except (ValueError, KeyError) as e:
        raise BenchArgumentError(f"backend {spec!r}: {e}") from None
    return fmt


def parse_backends(spec: str | Sequence[str]) -> List[Backend]:
    """Backends from a comma-separated list (or a list) of names; see the module docstring.

    Raises :class:`BenchArgumentError` for an unknown name, a bad format or a repeated name.

    Example:
        >>> [b.label for b in parse_backends("onnxruntime-int8,fpga-model")]
        ['onnxruntime int8 (QDQ U8S8)', 'fpga-model brainwave-s10 (estimate)']
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise BenchArgumentError(f"no backends given; choose from {BACKEND_HELP}")
    out: List[Backend] = []
    first_bfp: Optional[str] = None
    pending_serving: List[ServingBackend] = []
    for item in items:
        low = item.lower()
        head, _, rest = low.partition(":")
        b: Backend
        if head in ("bfp", "bfpaccel"):
            fmt = _check_format(rest or "msfp16", item)
            b = BfpBackend(fmt)
            first_bfp = first_bfp or fmt
        elif low in ("onnxruntime", "ort", "onnxruntime-fp32"):
            b = OnnxruntimeBackend()
        elif low in ("onnxruntime-int8", "ort-int8"):
            b = OnnxruntimeInt8Backend()
        elif low in ("tensorflow", "tf"):
            b = TensorflowBackend()
        elif low in ("cuda", "gpu"):
            b = CudaBackend()
        elif head == "fpga-model":
            b = FpgaModelBackend(rest or DEFAULT_NPU)
        elif head == "serving":
            parts = [p for p in rest.split(":") if p] if rest else []
            jpeg = "jpeg" in parts
            fmts = [p for p in parts if p != "jpeg"]
            if len(fmts) > 1:
                raise BenchArgumentError(f"backend {item!r}: expected serving[:FORMAT][:jpeg]")
            sb = ServingBackend(_check_format(fmts[0], item) if fmts else None, jpeg)
            if not fmts:
                pending_serving.append(sb)
            b = sb
        else:
            raise BenchArgumentError(f"unknown backend {item!r}; choose from {BACKEND_HELP}")
        if any(o.name == b.name for o in out):
            raise BenchArgumentError(f"backend {b.name!r} is given twice")
        out.append(b)
    for sb in pending_serving:  # serving without a format serves the first bfp: backend's plan
        sb.fmt = first_bfp or "msfp16"
    return out
