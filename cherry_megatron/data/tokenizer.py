"""Tokenizers behind megatron-core's tokenizer interface (vocab_size, eod, tokenize): a sentencepiece `.model`
or a Hugging Face tokenizer (a directory holding `tokenizer.json`, or that file itself).

`data.tokenizer_model` names either; `kind` tells them apart by the file. EOD and BOS follow the tokenizer:
a document is encoded as the tokenizer encodes text by default (a Hugging Face tokenizer adds its BOS if its
config says so; SmolLM2's adds none) and ends with its EOS as the end-of-document token.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from cherry_megatron import compat
from cherry_megatron.errors import DataError

HF_FILE = "tokenizer.json"


def kind(path: str) -> str:
    """'huggingface' for a directory or a .json file, 'sentencepiece' otherwise."""
    return "huggingface" if os.path.isdir(path) or str(path).endswith(".json") else "sentencepiece"


def tokenizer_file(path: str) -> str:
    """The file that defines the tokenizer at `path` (what fingerprints hash): the .model or tokenizer.json."""
    if kind(path) == "sentencepiece":
        return path
    return os.path.join(path, HF_FILE) if os.path.isdir(path) else path


def fingerprint(path: str) -> str:
    """sha256 of the tokenizer's defining file: data and models agree on a tokenizer when these agree."""
    h = hashlib.sha256()
    with open(tokenizer_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(model_path: str):
    if not model_path:
        raise DataError("data.tokenizer_model is not set (a sentencepiece .model file or a Hugging Face tokenizer "
                        "directory; `make data` builds one)")
    if kind(model_path) == "huggingface":
        return _load_hf(model_path)
    if not os.path.isfile(model_path):
        raise DataError(f"tokenizer model not found: {model_path} (run `make data` or tools/train_tokenizer.py)")
    # Here, inside the hiding: megatron.core.tokenizers imports the text tokenizer libraries it wraps.
    with compat.hidden_module("transformers"):
        from megatron.core.tokenizers import MegatronTokenizer

        try:
            tok = MegatronTokenizer.from_pretrained(tokenizer_path=model_path,
                                                    metadata_path={"library": "sentencepiece"})
            proto = sentencepiece_model_pb2.ModelProto()
            with open(model_path, "rb") as f:
                proto.ParseFromString(f.read())
        except (RuntimeError, OSError, ValueError, DecodeError) as e:
            # sentencepiece's C++ errors arrive as RuntimeError, its wrapper's decoding of piece names as
            # UnicodeDecodeError (a ValueError); anything else is a bug and keeps its traceback.
            raise DataError(f"cannot load sentencepiece model {model_path}: {str(e).splitlines()[0]}") from None
    missing = [spec for spec in ("trainer_spec", "normalizer_spec") if not proto.HasField(spec)]
    if missing:
        # A file cut at a field boundary is still a valid ModelProto: cut before its normalizer spec it loads
        # with sentencepiece's default normalization (whitespace handling changes), cut before its trainer spec
        # it may load without byte fallback. The trainer always writes both specs.
        raise DataError(f"cannot load sentencepiece model {model_path}: truncated (no {missing[0].replace('_', ' ')})")
    return tok


def _load_hf(path: str):
    """megatron-core's HuggingFaceTokenizer (transformers' AutoTokenizer, fast) over the directory of `path`.
    It encodes as `AutoTokenizer(text).input_ids` (include_special_tokens), so a BOS the tokenizer's config
    adds is kept."""
    file = tokenizer_file(path)
    if not os.path.isfile(file):
        raise DataError(f"{path} holds no {HF_FILE}: not a Hugging Face tokenizer")
    try:
        json.loads(Path(file).read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot load Hugging Face tokenizer {file}: truncated or not a tokenizer ({e})") from None
    directory = os.path.dirname(os.path.abspath(file))
    if os.path.basename(file) != HF_FILE:
        raise DataError(f"{file}: a Hugging Face tokenizer file must be named {HF_FILE}; give its directory")
    from megatron.core.tokenizers import MegatronTokenizer

    compat.transformers_for_megatron_tokenizers()
    try:
        tok = MegatronTokenizer.from_pretrained(tokenizer_path=directory, metadata_path={"library": "huggingface"},
                                                use_fast=True, include_special_tokens=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"cannot load Hugging Face tokenizer {directory}: {str(e).splitlines()[0]}") from None
    if tok.eod is None:
        raise DataError(f"Hugging Face tokenizer {directory} names no eos_token (tokenizer_config.json): "
                        "documents need an end-of-document token")
    return tok

