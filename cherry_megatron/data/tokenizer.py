"""The sentencepiece tokenizer behind megatron-core's tokenizer interface (vocab_size, eod, pad)."""
from __future__ import annotations

import os

from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from cherry_megatron import compat
from cherry_megatron.errors import DataError


def load_tokenizer(model_path: str):
    if not model_path:
        raise DataError("data.tokenizer_model is not set (a sentencepiece .model file; `make data` builds one)")
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
