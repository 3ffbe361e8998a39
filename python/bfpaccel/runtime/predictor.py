"""``Predictor``: encoded images in, named outputs out -- the serving path of a plan.

The converter records the model's image front (decoding, resize/crop, mean subtraction: the
seed's ``preprocess_array``) in the ONNX metadata (``bfpaccel.preprocess``), and the seed's
tensor names and aliases of the outputs (``bfpaccel.outputs``); the plan keeps both.  A
``Predictor`` applies exactly that preprocessing with numpy (bit-exact with the TF graph op)
and answers with the seed's output names, so the server, the CLI and user code all run the
same pipeline without TensorFlow.

A plan may record a text front instead (:mod:`bfpaccel.textfront`: a tokenizer, the inputs it
feeds, the pooling of an output into sentence embeddings); :meth:`Predictor.predict_texts` and
:meth:`Predictor.embed` then take sentences.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..preprocess import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_RESIZE_PIXELS, _check_limit
from ..textfront import TEXT_FRONT_KEY, TextFront
from .plan import Plan, load_plan
from .session import Session
from .values import LoweringError

__all__ = ["Predictor", "top_k"]


def top_k(probs: np.ndarray, k: int = 5, labels: Optional[Sequence[str]] = None) -> List[tuple]:
    """The ``k`` largest entries of a 1-D score vector as ``(index, score[, label])``."""
    p = np.asarray(probs).reshape(-1)
    idx = np.argsort(-p, kind="stable")[:k]
    if labels is None:
        return [(int(i), float(p[i])) for i in idx]
    return [(int(i), float(p[i]), labels[i] if i < len(labels) else str(i)) for i in idx]


class Predictor:
    """Runs a plan on encoded images (JPEG/PNG/GIF bytes), on sentences (a plan with a text
    front) or on tensors (float, or integer token ids and masks).

    Args:
        plan: a :class:`Plan` or a plan file path.
        num_threads: threads of the C++ core for this predictor's session (``None``: the
            process setting).
        kernel: the kernel of this predictor's session (``None``: the process setting); see
            :class:`Session` -- options apply to this predictor only.
        max_image_pixels: largest declared width x height of an encoded image (checked from the
            header before decoding; default ``bfpaccel.preprocess.DEFAULT_MAX_IMAGE_PIXELS``,
            8192 x 8192); ``None``: no limit.
        max_resize_pixels: largest full (pre-crop) size of the resize an image goes through
            (default ``DEFAULT_MAX_RESIZE_PIXELS``, 16 Mi pixels: aspect ratios up to 256:1 at
            the seed's 256 shorter side); ``None``: no limit.  Both raise
            ``bfpaccel.preprocess.ImageTooLargeError`` (a ``ValueError``).

    Example:
        >>> p = bfpaccel.Predictor("resnet50.bfpplan")  # doctest: +SKIP
        >>> out = p.predict_images([open("cat.jpg", "rb").read()])  # doctest: +SKIP
        >>> top_k(out["classifier/resnet_v1_50/predictions/Softmax:0"][0])  # doctest: +SKIP
    """

    def __init__(self, plan: Union[Plan, str, "os.PathLike[str]"], num_threads: Optional[int] = None, *,
                 kernel: Optional[str] = None, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 max_resize_pixels: Optional[int] = DEFAULT_MAX_RESIZE_PIXELS):
        self.max_image_pixels = _check_limit("max_image_pixels", max_image_pixels)
        self.max_resize_pixels = _check_limit("max_resize_pixels", max_resize_pixels)
        self.plan = plan if isinstance(plan, Plan) else load_plan(plan)
        self.session = Session(self.plan, num_threads=num_threads, kernel=kernel)
        meta = self.plan.metadata
        self.preprocess_spec: Optional[Dict[str, Any]] = (
            json.loads(meta["bfpaccel.preprocess"]) if "bfpaccel.preprocess" in meta else None)
        outs = json.loads(meta["bfpaccel.outputs"]) if "bfpaccel.outputs" in meta else None
        #: seed/TF tensor name -> plan output name
        self.output_map: Dict[str, str] = {}
        #: alias (e.g. "output_alias") -> seed/TF tensor name
        self.aliases: Dict[str, str] = {}
        if outs:
            for o in outs:
                name = o.get("name") or o.get("onnx_output")
                onnx_name = o.get("onnx_output") or name
                self.output_map[name] = onnx_name
                if o.get("alias"):
                    self.aliases[o["alias"]] = name
        else:
            self.output_map = {n: n for n in self.plan.output_names}
        spec = self.preprocess_spec or {}
        self.input_name: str = spec.get("onnx_input") or self.plan.input_names[0]
        #: names a client may use for the image input (tensor name, alias, ONNX input)
        self.input_aliases = {self.input_name}
        for k in ("string_input", "input_alias"):
            if spec.get(k):
                self.input_aliases.add(spec[k])
        #: the plan's text front (sentences in, embeddings out), or None
        self.text_front: Optional["TextFront"] = None
        if TEXT_FRONT_KEY in meta:
            self.text_front = TextFront.from_json(meta[TEXT_FRONT_KEY])
            self.input_aliases.add(self.text_front.input_alias)
        # a model of several inputs (token ids and a mask) takes each under its name
        self.input_aliases.update(self.plan.input_names)
        self._preprocess_fn: Optional[Callable[[bytes], np.ndarray]] = None

    @property
    def output_names(self) -> List[str]:
        """Output names in the seed's naming (TF tensor names where recorded)."""
        return list(self.output_map)

    @property
    def input_names(self) -> List[str]:
        """The plan's tensor inputs (the model's own names)."""
        return self.plan.input_names

    @property
    def takes_text(self) -> bool:
        """True when the plan records a text front (sentences are accepted)."""
        return self.text_front is not None

    @property
    def takes_images(self) -> bool:
        """True when the plan records an image front (encoded images are accepted)."""
        spec = self.preprocess_spec or {}
        return str(spec.get("kind", "")).startswith("image")

    def resolve_output(self, name: str) -> str:
        """Seed tensor name for ``name`` (a tensor name, an alias or an ONNX output name)."""
        if name in self.output_map:
            return name
        if name in self.aliases:
            return self.aliases[name]
        for k, v in self.output_map.items():
            if v == name:
                return k
        raise KeyError(f"unknown output {name!r}; the model's outputs are {self.output_names}"
                       + (f" (aliases {list(self.aliases)})" if self.aliases else ""))

    def preprocess(self, images: Sequence[bytes]) -> np.ndarray:
        """Decodes and preprocesses encoded images into the model's float input batch."""
        if not self.takes_images:
            raise ValueError("this model records no image preprocessing: feed float tensors")
        if isinstance(images, (bytes, bytearray)):
            images = [bytes(images)]
        if len(images) == 0:
            raise ValueError("no images given")
        if self._preprocess_fn is None:
            self._preprocess_fn = _preprocessor(self.preprocess_spec or {}, self.max_image_pixels,
                                                self.max_resize_pixels)
        arrs = [self._preprocess_fn(b) for b in images]
        return np.stack(arrs).astype(np.float32, copy=False)

    def predict(self, x: Union[np.ndarray, Mapping[str, np.ndarray]], outputs: Optional[Sequence[str]] = None
                ) -> Dict[str, np.ndarray]:
        """Runs the plan on an input batch; returns seed-named outputs.

        ``x`` is the array of the model's (single) input, or a mapping input name -> array for a
        model of several inputs (a text encoder's ``input_ids`` and ``attention_mask``: integer
        arrays, kept integer)."""
        names = [self.resolve_output(o) for o in outputs] if outputs is not None else self.output_names
        feeds = dict(x) if isinstance(x, Mapping) else {self.input_name: x}
        try:
            res = self.session.run([self.output_map[n] for n in names], feeds)
        except LoweringError as e:
            ints = {k: list(np.shape(v)) for k, v in feeds.items() if np.asarray(v).dtype.kind in "iu"}
            if not ints:
                raise
            raise LoweringError(f"the model cannot run inputs of shapes {ints}: {e} (a sequence longer than the "
                                "model's position table, or inputs whose sequence lengths differ, fail this "
                                "way)") from None
        return {n: res[self.output_map[n]] for n in names}

    def predict_texts(self, texts: Union[str, Sequence[str]], outputs: Optional[Sequence[str]] = None
                      ) -> Dict[str, np.ndarray]:
        """Tokenizes sentences with the plan's text front, runs the plan and pools its output.

        Args:
            texts: a sentence or a list of them (one batch, padded as the front says).
            outputs: names to return: the front's ``embedding_name`` and/or outputs of the
                model (token embeddings...); default: the embedding only.

        Returns:
            name -> array; the embedding is float32 ``[len(texts), width]``.

        Raises:
            ValueError: the plan has no text front, no texts, a text over ``max_length``
                (with ``truncation=False``), an unknown output name.
        """
        feeds, model_outs, post = self.text_request(texts, outputs)
        return post(self.predict(feeds, model_outs))

    def text_request(self, texts: Union[str, Sequence[str]], outputs: Optional[Sequence[str]] = None
                     ) -> Tuple[Dict[str, np.ndarray], List[str], Callable[[Dict[str, np.ndarray]],
                                                                          Dict[str, np.ndarray]]]:
        """The three steps of :meth:`predict_texts` apart, for callers that run the model
        themselves (the server's batching): ``(feeds, model outputs to fetch, post)`` where
        ``post(results)`` turns the model's results of these feeds (rows in order) into
        ``predict_texts``'s answer (the pooled embedding and/or model outputs).

        Raises:
            ValueError: as :meth:`predict_texts`.
        """
        front = self.text_front
        if front is None:
            raise ValueError("this model records no text front: feed token ids (or attach a text front: "
                             "bfpaccel.textfront.attach_text_front)")
        emb = front.embedding_name
        want = [emb] if outputs is None else list(dict.fromkeys(outputs))
        pooled = self.resolve_output(front.output) if front.output is not None else self.output_names[0]
        model_outs = [self.resolve_output(o) for o in want if o != emb]
        if emb in want and pooled not in model_outs:
            model_outs.append(pooled)
        feeds = front.feeds(texts, self.plan.input_dtypes)
        mask = feeds[front.attention_mask] if front.attention_mask is not None else \
            np.ones(feeds[front.input_ids].shape, np.int64)

        def post(res: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
            return {o: front.pool(res[pooled], mask) if o == emb else res[self.resolve_output(o)] for o in want}
        return feeds, model_outs, post

    def embed(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        """Sentence embeddings ``[len(texts), width]`` (float32) of the plan's text front."""
        front = self.text_front
        if front is None:
            raise ValueError("this model records no text front: feed token ids")
        return self.predict_texts(texts)[front.embedding_name]

    def predict_images(self, images: Sequence[bytes], outputs: Optional[Sequence[str]] = None
                       ) -> Dict[str, np.ndarray]:
        """Preprocesses encoded images the model's way and runs the plan."""
        return self.predict(self.preprocess(images), outputs)


def _preprocessor(spec: Dict[str, Any], max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                  max_resize_pixels: Optional[int] = DEFAULT_MAX_RESIZE_PIXELS) -> Callable[[bytes], np.ndarray]:
    kind = spec.get("kind")
    if kind == "image":
        from ..preprocess import preprocess_image

        kw = dict(order=spec.get("order", "RGB"), scaling_factor=float(spec.get("scaling_factor", 1.0)),
                  output_height=int(spec.get("output_height", 224)), output_width=int(spec.get("output_width", 224)),
                  preserve_aspect_ratio=bool(spec.get("preserve_aspect_ratio", True)),
                  max_pixels=max_pixels, max_resize_pixels=max_resize_pixels)
        return lambda b: preprocess_image(b, **kw)
    if kind == "image-nchw":
        from ..models.efficientnet import preprocess_efficientnet
        from ..preprocess import ImageTooLargeError, _open

        size, shorter = int(spec.get("size", 224)), int(spec.get("resize_shorter", 256))

        def efficientnet(b: bytes) -> np.ndarray:
            h, w, decode = _open(b, max_pixels)  # the header only; max_pixels checked
            if max_resize_pixels is not None and min(h, w) >= 1:
                scale = shorter / min(h, w)  # preprocess_efficientnet's resize (Pillow, full size)
                new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
                if new_w * new_h > max_resize_pixels:
                    raise ImageTooLargeError(
                        f"image of {w}x{h} pixels would be resized to {new_w}x{new_h} = {new_w * new_h} pixels "
                        f"before the crop, over the limit max_resize_pixels={max_resize_pixels}",
                        "max_resize_pixels", max_resize_pixels, new_w * new_h, (w, h))
            return preprocess_efficientnet(decode(), size=size, resize_shorter=shorter)

        return efficientnet
    raise ValueError(f"unknown preprocessing kind {kind!r} in the plan's metadata")
