"""The sentencepiece tokenizer behind megatron-core's tokenizer interface (vocab_size, eod, pad)."""
from __future__ import annotations

import os

from cherry_megatron.errors import DataError


def load_tokenizer(model_path: str):
    if not model_path:
        raise DataError("data.tokenizer_model is not set (a sentencepiece .model file; `make data` builds one)")
    if not os.path.isfile(model_path):
        raise DataError(f"tokenizer model not found: {model_path} (run `make data` or tools/train_tokenizer.py)")
    from megatron.core.tokenizers import MegatronTokenizer

    try:
        return MegatronTokenizer.from_pretrained(tokenizer_path=model_path, metadata_path={"library": "sentencepiece"})
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ messages
        raise DataError(f"cannot load sentencepiece model {model_path}: {str(e).splitlines()[0]}") from None
