"""The sentencepiece tokenizer behind megatron-core's tokenizer interface (vocab_size, eod, pad)."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from cherry_megatron.errors import DataError


@contextmanager
def _hidden(module: str):
    """megatron.core.tokenizers imports every library it wraps, to load any one of them: transformers costs each
    training process ~1.5 s (x every rank, every launch) for a sentencepiece model. Its wrapper tolerates a
    missing transformers (HAVE_TRANSFORMERS), so hide it for that import only; later imports see it again."""
    if module in sys.modules or "megatron.core.tokenizers.text" in sys.modules:
        yield
        return
    sys.modules[module] = None  # `import module` raises ModuleNotFoundError while this is set
    try:
        yield
    finally:
        if sys.modules.get(module, 0) is None:
            del sys.modules[module]


def load_tokenizer(model_path: str):
    if not model_path:
        raise DataError("data.tokenizer_model is not set (a sentencepiece .model file; `make data` builds one)")
    if not os.path.isfile(model_path):
        raise DataError(f"tokenizer model not found: {model_path} (run `make data` or tools/train_tokenizer.py)")
    from megatron.core.tokenizers import MegatronTokenizer

    try:
        with _hidden("transformers"):  # from_pretrained imports the text tokenizer libraries
            return MegatronTokenizer.from_pretrained(tokenizer_path=model_path, metadata_path={"library": "sentencepiece"})
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ messages
        raise DataError(f"cannot load sentencepiece model {model_path}: {str(e).splitlines()[0]}") from None
