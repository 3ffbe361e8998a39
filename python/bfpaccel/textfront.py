"""The text front of a plan: sentences in, sentence embeddings out.

A plan may record how its text is tokenized and how the model's token outputs become one
embedding per sentence, as it records an image front (``bfpaccel.preprocess``) for encoded
images.  The :class:`TextFront` holds

* the tokenizer, serialized (the ``tokenizer.json`` of the ``tokenizers`` library: normalizer,
  pre-tokenizer, WordPiece/BPE/Unigram model, vocabulary, ``[CLS] ... [SEP]`` template);
* ``max_length`` (tokens, special tokens included), ``truncation`` and ``padding``
  (``"longest"`` in each batch or ``"max_length"``; optionally up to a multiple of
  ``pad_to_multiple_of``, which bounds the number of sequence lengths a server lowers);
* which model inputs take the ``input_ids``, the ``attention_mask`` and the
  ``token_type_ids`` (cast to each input's declared integer type);
* the pooling of the model output ``output``: ``"mean"`` over the attention mask or
  ``"cls"`` (the first token) of a ``[batch, sequence, width]`` output, or ``"none"`` for an
  output that already is ``[batch, width]``; then an optional L2 normalisation.  Pooling runs
  in float64 and is rounded to float32 once, in numpy, identically in-process and in the server.

It is stored in the plan's metadata under :data:`TEXT_FRONT_KEY` (JSON) by
:func:`attach_text_front` or ``bfpaccel.compile(..., text_front=...)``, survives
:meth:`Plan.save` / :func:`load_plan`, and is used by :class:`bfpaccel.Predictor`
(``predict_texts`` / ``embed``) and by the server (DT_STRING sentences over TF Serving Predict,
BYTES over KServe v2, strings over TF REST).

The ``tokenizers`` package (Rust) is needed only to tokenize: ``pip install 'bfpaccel[text]'``.

Example:
    >>> front = TextFront(tokenizer="tokenizer.json", pooling="mean", normalize=True,
    ...                   output="token_embeddings")  # doctest: +SKIP
    >>> plan = bfpaccel.compile("minilm.onnx", "msfp16", text_front=front)  # doctest: +SKIP
    >>> bfpaccel.Predictor(plan).embed(["A man is eating food."]).shape  # doctest: +SKIP
    (1, 384)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["TextFront", "TextFrontError", "TEXT_FRONT_KEY", "POOLINGS", "PADDINGS", "attach_text_front",
           "load_tokenizer", "pool"]

#: The plan metadata key of the text front (a JSON object).
TEXT_FRONT_KEY = "bfpaccel.text"
#: Version of the stored text front's layout.
TEXT_FRONT_VERSION = 1
#: Poolings of the model output: mean over the attention mask, the first token, none (already pooled).
POOLINGS = ("mean", "cls", "none")
#: Padding of a batch: to its longest sequence, or to ``max_length``.
PADDINGS = ("longest", "max_length")
#: Largest ``max_length`` accepted (far beyond any position table; bounds a batch's memory).
MAX_MAX_LENGTH = 1 << 16
_INSTALL = "pip install 'bfpaccel[text]' (or: pip install tokenizers)"


class TextFrontError(ValueError):
    """A text front that cannot be used with a plan (bad setting, unknown input/output, a
    tokenizer that does not load); the message names the problem."""


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ImportError(f"a text front needs the tokenizers package: {_INSTALL}") from None
    return tokenizers


def _tokenizer_json(tok: Any) -> str:
    """A tokenizer (``tokenizers.Tokenizer``, a ``tokenizer.json`` path, or its JSON text) as
    JSON text; its own truncation and padding are dropped (the front sets them)."""
    if isinstance(tok, (str, os.PathLike)):
        s = os.fspath(tok)
        if s.lstrip().startswith("{"):
            text = s
        else:
            if not os.path.isfile(s):
                raise TextFrontError(f"tokenizer file not found: {s}")
            with open(s, encoding="utf-8") as f:
                text = f.read()
    elif hasattr(tok, "to_str"):
        text = tok.to_str()
    else:
        raise TextFrontError(f"tokenizer must be a tokenizers.Tokenizer, a tokenizer.json path or its JSON text, "
                             f"got {type(tok).__name__}")
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise TextFrontError(f"the tokenizer is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "model" not in doc:
        raise TextFrontError("the tokenizer JSON is not a tokenizers tokenizer (no 'model')")
    doc["truncation"] = None
    doc["padding"] = None
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def load_tokenizer(tokenizer: Any) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``Tokenizer``, a ``tokenizer.json`` path or its JSON
    text (truncation and padding off).

    Raises:
        ImportError: the ``tokenizers`` package is missing.
        TextFrontError: the tokenizer does not load.
    """
    text = _tokenizer_json(tokenizer)
    tk = _tokenizers()
    try:
        return tk.Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises its own exception type
        raise TextFrontError(f"the tokenizer JSON does not load: {e}") from None


def _name(value: Any, what: str, optional: bool = False) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise TextFrontError(f"{what} must be a non-empty string{' or None' if optional else ''}, got {value!r}")
    return value


@dataclass(frozen=True)
class TextFront:
    """How a plan turns sentences into its inputs and its output into sentence embeddings.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``, the path of a ``tokenizer.json`` or its JSON
            text; stored as JSON text (its own truncation/padding settings are dropped).
        max_length: longest sequence in tokens, special tokens included (>= 2).
        truncation: cut longer texts to ``max_length`` (``False``: such a text is an error).
        padding: ``"longest"`` (each batch to its longest sequence) or ``"max_length"``.
        pad_to_multiple_of: pad the sequence length up to a multiple of this (at most
            ``max_length``): fewer distinct shapes, each lowered once per session.
        pad_token: the padding token (default: the tokenizer's own, else ``[PAD]`` / ``<pad>``).
        input_ids: the model input that takes the token ids.
        attention_mask: the model input that takes the attention mask (``None``: none).
        token_type_ids: the model input that takes the token type ids (``None``: none).
        output: the model output to pool (a plan output name, or a name of the plan's
            ``bfpaccel.outputs``); ``None``: the plan's only output.
        pooling: ``"mean"`` (over the attention mask), ``"cls"`` (first token) or ``"none"``.
        normalize: L2-normalise each embedding.
        embedding_name: the name of the embedding output (in-process and on the wire).
        input_alias: the input name clients send sentences under (server).

    Raises:
        TextFrontError: a bad setting (the message names it); ImportError when a tokenizer
            object is given and ``tokenizers`` is missing is not raised here (loading is lazy).
    """

    tokenizer: Any
    max_length: int = 128
    truncation: bool = True
    padding: str = "longest"
    pad_to_multiple_of: Optional[int] = None
    pad_token: Optional[str] = None
    input_ids: str = "input_ids"
    attention_mask: Optional[str] = "attention_mask"
    token_type_ids: Optional[str] = None
    output: Optional[str] = None
    pooling: str = "mean"
    normalize: bool = False
    embedding_name: str = "embedding"
    input_alias: str = "text"
    _tok: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokenizer", _tokenizer_json(self.tokenizer))
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, (int, np.integer)) or \
                not 2 <= self.max_length <= MAX_MAX_LENGTH:
            raise TextFrontError(f"max_length must be an int in [2, {MAX_MAX_LENGTH}], got {self.max_length!r}")
        object.__setattr__(self, "max_length", int(self.max_length))
        for flag in ("truncation", "normalize"):
            if not isinstance(getattr(self, flag), bool):
                raise TextFrontError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.padding not in PADDINGS:
            raise TextFrontError(f"padding must be one of {', '.join(PADDINGS)}, got {self.padding!r}")
        m = self.pad_to_multiple_of
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or
                              not 1 <= m <= self.max_length):
            raise TextFrontError(f"pad_to_multiple_of must be None or an int in [1, max_length={self.max_length}], "
                                 f"got {m!r}")
        if self.pooling not in POOLINGS:
            raise TextFrontError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        _name(self.pad_token, "pad_token", optional=True)
        _name(self.input_ids, "input_ids")
        _name(self.attention_mask, "attention_mask", optional=True)
        _name(self.token_type_ids, "token_type_ids", optional=True)
        _name(self.output, "output", optional=True)
        _name(self.embedding_name, "embedding_name")
        _name(self.input_alias, "input_alias")
        used = [n for n in (self.input_ids, self.attention_mask, self.token_type_ids) if n is not None]
        if len(set(used)) != len(used):
            raise TextFrontError(f"input_ids, attention_mask and token_type_ids must name different model inputs, "
                                 f"got {used}")
        if self.pooling == "mean" and self.attention_mask is None:
            raise TextFrontError("pooling='mean' averages over the attention mask: give attention_mask (the model "
                                 "input that takes it)")

    # -- inputs ------------------------------------------------------------------------------
    @property
    def model_inputs(self) -> List[str]:
        """The model inputs the front feeds (ids, then mask and type ids where given)."""
        return [n for n in (self.input_ids, self.attention_mask, self.token_type_ids) if n is not None]

    def _tokenizer(self) -> Any:
        if self._tok is None:
            tok = load_tokenizer(self.tokenizer)
            if self.truncation:
                tok.enable_truncation(self.max_length)
            pad = self.pad_token
            if pad is None:
                pad = next((t for t in ("[PAD]", "<pad>") if tok.token_to_id(t) is not None), None)
                if pad is None:
                    raise TextFrontError("the tokenizer has no [PAD] or <pad> token: give pad_token")
            pad_id = tok.token_to_id(pad)
            if pad_id is None:
                raise TextFrontError(f"pad_token {pad!r} is not in the tokenizer's vocabulary")
            tok.enable_padding(pad_id=pad_id, pad_token=pad, pad_to_multiple_of=self.pad_to_multiple_of,
                               length=self.max_length if self.padding == "max_length" else None)
            object.__setattr__(self, "_tok", tok)
        return self._tok

    def tokenize(self, texts: Union[str, Sequence[str]]) -> Dict[str, np.ndarray]:
        """Tokenizes a batch: ``{"input_ids", "attention_mask", "token_type_ids"}`` as int64
        ``[batch, length]`` arrays (the keys are these three names, not the model's).

        Raises:
            TypeError: a text that is not a ``str``.
            ValueError: no texts, or (``truncation=False``) a text longer than ``max_length``.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("no texts given")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is a {type(t).__name__}, not a str")
        tok = self._tokenizer()
        encs = tok.encode_batch(texts)
        if not self.truncation:
            for i, e in enumerate(encs):
                n = int(sum(e.attention_mask))
                if n > self.max_length:
                    raise ValueError(f"text {i} has {n} tokens, over max_length={self.max_length} (the text front "
                                     "does not truncate)")
        # padding up to a multiple may pass max_length: only padding lies beyond it (longer texts
        # were cut or refused above)
        L = min(max(len(e.ids) for e in encs), self.max_length)
        out = {"input_ids": np.zeros((len(encs), L), np.int64), "attention_mask": np.zeros((len(encs), L), np.int64),
               "token_type_ids": np.zeros((len(encs), L), np.int64)}
        for i, e in enumerate(encs):
            out["input_ids"][i] = e.ids[:L]
            out["attention_mask"][i] = e.attention_mask[:L]
            out["token_type_ids"][i] = e.type_ids[:L]
        return out

    def feeds(self, texts: Union[str, Sequence[str]], dtypes: Optional[Dict[str, str]] = None
              ) -> Dict[str, np.ndarray]:
        """The model's feeds for a batch of texts: model input name -> array, of the input's
        declared integer type in ``dtypes`` (default int64)."""
        enc = self.tokenize(texts)
        dtypes = dtypes or {}
        out: Dict[str, np.ndarray] = {}
        for key, name in (("input_ids", self.input_ids), ("attention_mask", self.attention_mask),
                          ("token_type_ids", self.token_type_ids)):
            if name is not None:
                out[name] = enc[key].astype(dtypes.get(name, "int64"), copy=False)
        return out

    # -- output ------------------------------------------------------------------------------
    def pool(self, output: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The sentence embeddings ``[batch, width]`` (float32) of the model output (see :func:`pool`)."""
        return pool(output, attention_mask, self.pooling, self.normalize)

    # -- storage -----------------------------------------------------------------------------
    def to_json(self) -> str:
        """The front as the JSON text stored in the plan (the tokenizer as a nested object)."""
        d: Dict[str, Any] = {"kind": "text", "version": TEXT_FRONT_VERSION}
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            v = getattr(self, f.name)
            d[f.name] = json.loads(v) if f.name == "tokenizer" else v
        return json.dumps(d, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "TextFront":
        """Reads :meth:`to_json`'s text back.

        Raises:
            TextFrontError: not a text front, a newer layout, unknown or bad fields.
        """
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError, TypeError) as e:
            raise TextFrontError(f"the plan's text front is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("kind") != "text":
            raise TextFrontError("the plan's text front is not a JSON object of kind 'text'")
        v = d.pop("version", None)
        if not isinstance(v, int) or v > TEXT_FRONT_VERSION:
            raise TextFrontError(f"the plan's text front has layout version {v!r}; this bfpaccel reads "
                                 f"{TEXT_FRONT_VERSION} and older: upgrade bfpaccel")
        d.pop("kind")
        names = {f.name for f in fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TextFrontError(f"the plan's text front has unknown fields {unknown}")
        if "tokenizer" not in d:
            raise TextFrontError("the plan's text front has no tokenizer")
        tok = d.pop("tokenizer")
        if not isinstance(tok, dict):
            raise TextFrontError("the plan's text front tokenizer is not a JSON object")
        return cls(tokenizer=json.dumps(tok, ensure_ascii=False), **d)

    @classmethod
    def from_plan(cls, plan: Any) -> Optional["TextFront"]:
        """The text front recorded in a plan's metadata, or ``None``."""
        text = plan.metadata.get(TEXT_FRONT_KEY)
        return None if text is None else cls.from_json(text)

    def with_options(self, **changes: Any) -> "TextFront":
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)


def pool(output: np.ndarray, attention_mask: np.ndarray, pooling: str, normalize: bool = False) -> np.ndarray:
    """Sentence embeddings from a model output.

    ``"mean"``: the average of ``output[i, t]`` over the tokens ``t`` whose mask is non-zero;
    ``"cls"``: ``output[:, 0]``; ``"none"``: ``output`` itself (``[batch, width]``).  With
    ``normalize``, each row is divided by ``max(||row||_2, 1e-12)``.  Sums and the norm are
    taken in float64 and the result is rounded to float32 once.

    Raises:
        ValueError: an output of the wrong rank, or a mask that does not match it.
    """
    x = np.asarray(output)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if pooling == "none":
        if x.ndim != 2:
            raise ValueError(f"pooling 'none' takes a [batch, width] output, got shape {list(x.shape)}")
        emb = x.astype(np.float64)
    else:
        if x.ndim != 3:
            raise ValueError(f"pooling {pooling!r} takes a [batch, sequence, width] output, got shape "
                             f"{list(x.shape)}")
        if pooling == "cls":
            emb = x[:, 0, :].astype(np.float64)
        else:
            m = np.asarray(attention_mask)
            if m.shape != x.shape[:2]:
                raise ValueError(f"the attention mask has shape {list(m.shape)}, the output {list(x.shape)}")
            m = (m != 0).astype(np.float64)
            total = np.einsum("nsh,ns->nh", x.astype(np.float64), m)
            emb = total / np.maximum(m.sum(axis=1), 1e-9)[:, None]
    if normalize:
        emb = emb / np.maximum(np.sqrt(np.einsum("nh,nh->n", emb, emb)), 1e-12)[:, None]
    return np.ascontiguousarray(emb, dtype=np.float32)


def attach_text_front(plan: Any, front: TextFront, *, check_length: bool = True) -> Any:
    """A plan (sharing ``plan``'s graph and weights) with ``front`` recorded in its metadata.

    Checks the front against the plan: its inputs exist and are declared integer, every model
    input is fed by the front, ``output`` is an output of the plan (the only one when not
    given) of the rank the pooling needs, the names it adds do not shadow the plan's, and the
    tokenizer loads.  With ``check_length``, the plan is lowered once for ``[1, max_length]``
    so that a ``max_length`` beyond what the model runs (its position table) fails here.

    Raises:
        TextFrontError: the front does not fit the plan (the message says why).
        ImportError: the ``tokenizers`` package is missing.
    """
    from .runtime.plan import Plan

    if not isinstance(plan, Plan):
        raise TypeError(f"attach_text_front takes a Plan, got {type(plan).__name__}")
    if not isinstance(front, TextFront):
        raise TypeError(f"front must be a TextFront, got {type(front).__name__}")
    declared = plan.input_dtypes
    for what, name in (("input_ids", front.input_ids), ("attention_mask", front.attention_mask),
                       ("token_type_ids", front.token_type_ids)):
        if name is None:
            continue
        if name not in declared:
            raise TextFrontError(f"{what}={name!r} is not an input of the plan (inputs: {plan.input_names})")
        if np.dtype(declared[name]).kind not in "iu":
            raise TextFrontError(f"{what}={name!r} is declared {declared[name]}; token inputs must be integer")
    unfed = [n for n in plan.input_names if n not in front.model_inputs]
    if unfed:
        raise TextFrontError(f"the plan's input(s) {unfed} are not fed by the text front (it feeds "
                             f"{front.model_inputs}): name them as input_ids / attention_mask / token_type_ids")
    out_map = _output_map(plan)
    if front.output is None:
        if len(out_map) != 1:
            raise TextFrontError(f"the plan has {len(out_map)} outputs {list(out_map)}: give output= (--text-output: "
                                 "the one to pool)")
        front = replace(front, output=next(iter(out_map)))
    assert front.output is not None
    onnx_out = out_map.get(front.output) or (front.output if front.output in plan.output_names else None)
    if onnx_out is None:
        raise TextFrontError(f"output={front.output!r} is not an output of the plan (outputs: {list(out_map)})")
    shape = {v.name: v.shape for v in plan.graph.outputs}.get(onnx_out)
    rank = 2 if front.pooling == "none" else 3
    if shape is not None and len(shape) != rank:
        raise TextFrontError(f"pooling={front.pooling!r} needs a rank-{rank} output; {front.output!r} has shape "
                             f"{['?' if d is None else d for d in shape]}"
                             + (" (give the token embeddings, or pooling='none' for an embedding output)"
                                if rank == 3 else " (give pooling='mean' or 'cls' for token outputs)"))
    if front.embedding_name in out_map or front.embedding_name in plan.output_names:
        raise TextFrontError(f"embedding_name={front.embedding_name!r} is already an output of the plan: pick "
                             "another name")
    if front.input_alias in plan.input_names:
        raise TextFrontError(f"input_alias={front.input_alias!r} is already an input of the plan: pick another name")
    front._tokenizer()  # loads (and configures) the tokenizer: a broken one fails now
    meta = dict(plan.metadata)
    meta[TEXT_FRONT_KEY] = front.to_json()
    out = Plan(plan.graph, meta, plan.format, plan.weight_format, plan.vector_precision, plan.seed)
    if check_length:
        _check_length(out, front)
    return out


def _output_map(plan: Any) -> Dict[str, str]:
    """Output name (the plan's ``bfpaccel.outputs`` naming where recorded) -> plan output."""
    outs = json.loads(plan.metadata["bfpaccel.outputs"]) if "bfpaccel.outputs" in plan.metadata else None
    if not outs:
        return {n: n for n in plan.output_names}
    res: Dict[str, str] = {}
    for o in outs:
        name = o.get("name") or o.get("onnx_output")
        res[name] = o.get("onnx_output") or name
    return res


def _check_length(plan: Any, front: TextFront) -> None:
    from .runtime.lower import lower

    shapes: Dict[str, Tuple[int, ...]] = {n: (1, front.max_length) for n in front.model_inputs}
    try:
        lower(plan, shapes)
    except ValueError as e:
        raise TextFrontError(f"the model cannot run sequences of max_length={front.max_length} tokens (a position "
                             f"table shorter than that?): lowering for {shapes} fails: {e}") from None
