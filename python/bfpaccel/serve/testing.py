"""Small things to test a server with, made on the spot (no TensorFlow, no downloads):
a tiny image classifier plan, encoded test images and a self-signed TLS certificate.

Example:
    >>> from bfpaccel.serve.testing import build_tiny_plan, make_image  # doctest: +SKIP
    >>> h = serve(build_tiny_plan("/tmp/tiny.bfpplan"), port=0)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import io
import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["build_tiny_plan", "make_image", "self_signed_cert", "TINY_OUTPUT", "TINY_CLASSES",
           "TINY_VOCAB", "TINY_POSITIONS", "tiny_tokenizer", "tiny_text_model", "build_tiny_text_plan"]

#: The tiny plan's output tensor name (seed-style) and its class count.
TINY_OUTPUT = "classifier/tiny/predictions/Softmax:0"
TINY_CLASSES = 10


def build_tiny_plan(path: str, format: str = "msfp16", seed: int = 0, classes: int = TINY_CLASSES,
                    output: str = TINY_OUTPUT) -> str:
    """Compiles a tiny NHWC conv net with the seed's image front (224x224 RGB) and writes it.

    Metadata: input alias ``images`` / string input ``Placeholder:0``; one output named
    ``output`` with alias ``output_alias``.  Returns ``path``.

    Example:
        >>> build_tiny_plan("/tmp/tiny.bfpplan")  # doctest: +SKIP
        '/tmp/tiny.bfpplan'
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ..runtime import compile as bfp_compile

    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    inits = {"w1": w(8, 3, 4, 4), "b1": w(8), "fc": w(8, classes), "fcb": w(classes)}
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["xt", "w1", "b1"], ["c1"], strides=[4, 4]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["fl"]),
        helper.make_node("Gemm", ["fl", "fc", "fcb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 224, 224, 3])],
                          [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", classes])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    helper.set_model_props(m, {
        "bfpaccel.preprocess": json.dumps({"kind": "image", "order": "RGB", "scaling_factor": 1.0,
                                           "output_height": 224, "output_width": 224,
                                           "preserve_aspect_ratio": True, "string_input": "Placeholder:0",
                                           "input_alias": "images", "onnx_input": "x"}),
        "bfpaccel.outputs": json.dumps([{"name": output, "alias": "output_alias", "onnx_output": "prob"}]),
    })
    onnx.checker.check_model(m)
    plan = bfp_compile(m, format=format)
    plan.save(path)
    return path


#: The tiny text encoder's vocabulary (WordPiece: ``##`` marks a continuation).
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world",
              "run", "##s", "##ing", ".", ",", "!", "is"]
#: The tiny text encoder's position table: longer sequences do not run.
TINY_POSITIONS = 16


def tiny_tokenizer() -> Any:
    """A ``tokenizers.Tokenizer`` over :data:`TINY_VOCAB` made on the spot: BERT's uncased
    normalizer and pre-tokenizer, WordPiece, ``[CLS] ... [SEP]``.

    Example:
        >>> tiny_tokenizer().encode("The cat sat.").ids  # doctest: +SKIP
        [2, 4, 6, 8, 16, 3]
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(TINY_VOCAB)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def build_tiny_text_plan(path: Optional[str] = None, format: str = "msfp16", seed: int = 0, width: int = 32,
                         text_front: Optional[Dict[str, Any]] = None) -> Any:
    """Compiles a tiny text encoder: token embeddings of :data:`TINY_VOCAB` plus a position
    table of :data:`TINY_POSITIONS` rows, a dense layer and ReLU, masked by the attention mask.
    Inputs ``input_ids`` / ``attention_mask`` (int64 ``[N, S]``), output ``token_embeddings``
    (``[N, S, width]``).  With ``text_front`` (keyword arguments of
    :class:`bfpaccel.textfront.TextFront`, ``{}`` for the defaults), the plan records a text
    front over :func:`tiny_tokenizer` pooling ``token_embeddings``.  Writes the plan to
    ``path`` when given; returns the :class:`~bfpaccel.runtime.plan.Plan`.

    Example:
        >>> plan = build_tiny_text_plan(text_front={"pooling": "mean", "normalize": True})  # doctest: +SKIP
    """
    from ..runtime import compile as bfp_compile

    m = tiny_text_model(seed, width)
    front = None
    if text_front is not None:
        from ..textfront import TextFront

        kw: Dict[str, Any] = {"tokenizer": tiny_tokenizer(), "max_length": TINY_POSITIONS, "output": "token_embeddings"}
        kw.update(text_front)
        front = TextFront(**kw)
    plan = bfp_compile(m, format=format, text_front=front)
    if path is not None:
        plan.save(path)
    return plan


def tiny_text_model(seed: int = 0, width: int = 32) -> Any:
    """The ONNX model (``onnx.ModelProto``) of :func:`build_tiny_text_plan`'s encoder."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    V, P, H = len(TINY_VOCAB), TINY_POSITIONS, int(width)
    inits = {"emb": rng.standard_normal((V, H)).astype(np.float32), "pos": (0.1 * rng.standard_normal((P, H))
                                                                            ).astype(np.float32),
             "w": (rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32),
             "b": (0.1 * rng.standard_normal(H)).astype(np.float32),
             "one": np.array(1, np.int64), "zero1": np.array([0], np.int64), "ax0": np.array([0], np.int64),
             "ax2": np.array([2], np.int64)}
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"]),
        helper.make_node("Shape", ["input_ids"], ["shp"]),
        helper.make_node("Gather", ["shp", "one"], ["slen"]),
        helper.make_node("Unsqueeze", ["slen", "ax0"], ["slen1"]),
        helper.make_node("Slice", ["pos", "zero1", "slen1", "ax0"], ["pe"]),
        helper.make_node("Add", ["tok", "pe"], ["h0"]),
        helper.make_node("MatMul", ["h0", "w"], ["h1"]),
        helper.make_node("Add", ["h1", "b"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "ax2"], ["m3"]),
        helper.make_node("Mul", ["h3", "m3"], ["token_embeddings"]),
    ]
    g = helper.make_graph(nodes, "tiny_text",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"]),
                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"])],
                          [helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["N", "S", H])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def make_image(kind: str = "jpeg", size: Tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    """An encoded RGB test image (``jpeg``, ``png`` or ``gif``) of ``size`` (w, h).

    Example:
        >>> make_image("png")[:4]
        b'\\x89PNG'
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format={"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "gif": "GIF"}[kind.lower()])
    return buf.getvalue()


def self_signed_cert(common_name: str = "localhost", out_dir: Optional[str] = None) -> Tuple[bytes, bytes]:
    """A self-signed certificate for ``common_name`` (+ SAN localhost/127.0.0.1) as
    ``(cert_pem, key_pem)``; also written to ``out_dir/cert.pem`` and ``key.pem`` if given.
    Uses ``cryptography`` when installed, else the ``openssl`` command.

    Example:
        >>> cert, key = self_signed_cert()  # doctest: +SKIP
    """
    try:
        cert, key = _cert_cryptography(common_name)
    except ImportError:
        cert, key = _cert_openssl(common_name)
    if out_dir:
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(data)
    return cert, key


def _cert_cryptography(cn: str) -> Tuple[bytes, bytes]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName(cn), x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2)).add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _cert_openssl(cn: str) -> Tuple[bytes, bytes]:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        k, c = os.path.join(d, "k.pem"), os.path.join(d, "c.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", k, "-out", c, "-days", "2", "-subj", f"/CN={cn}",
                        "-addext", f"subjectAltName=DNS:{cn},DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
        with open(c, "rb") as f1, open(k, "rb") as f2:
            return f1.read(), f2.read()
