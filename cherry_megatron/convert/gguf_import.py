"""A Llama-architecture GGUF file (llama.cpp's format) read as a `Checkpoint`, dequantized to fp32, with its
tokenizer.

transformers does the reading (`from_pretrained(gguf_file=..., GgufConfig(dequantize=True))`): it maps GGUF
names to Llama names, dequantizes every block type through the `gguf` package and undoes llama.cpp's
permutation of the q/k rows, which an importer of our own would have to repeat. Before it runs, the file's
header is checked here with `gguf.GGUFReader` (a memory map, no tensor data read): another architecture or a
file cut short is one clear error, where transformers would fail deep inside or, for a truncated file, map
past its end.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from cherry_megatron.convert.checkpoint import Checkpoint
from cherry_megatron.convert.hf_import import from_hf_tensors
from cherry_megatron.convert.hf_llama import from_hf_config
from cherry_megatron.errors import CheckpointError

_MAGIC = b"GGUF"


def check_gguf(path: Path) -> dict:
    """Header facts of a whole Llama GGUF: {architecture, tensors, bytes}; anything else is a CheckpointError."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if magic != _MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (its first bytes are {magic!r}, not {_MAGIC!r})")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch_field = reader.fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", "replace")
    except KeyError:
        raise CheckpointError(f"{path} has no general.architecture: not a model GGUF") from None
    except (ValueError, IndexError, OSError, UnicodeDecodeError) as e:
        # GGUFReader reshapes memory-mapped arrays as it parses: a file cut short fails as a reshape or index error
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {str(e)[:120]})") from None
    if arch != "llama":
        raise CheckpointError(f"{path} is a '{arch}' GGUF model, not Llama: only Llama-architecture GGUF files import")
    size = os.path.getsize(path)
    end = max(t.data_offset + t.n_bytes for t in reader.tensors) if reader.tensors else 0
    if not reader.tensors or end > size:
        raise CheckpointError(f"{path} is truncated: its tensors end at byte {end}, the file has {size}")
    return {"architecture": arch, "tensors": len(reader.tensors), "bytes": size}


def read_gguf(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file (a .gguf file is expected)")
    check_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        raise CheckpointError(f"transformers cannot read {path}: {str(e).splitlines()[0]}") from None
    hf = model.config.to_dict()
    hf["model_type"] = model.config.model_type
    cfg = from_hf_config(hf, str(path))
    cfg["name"] = path.stem
    state = {n: t.detach() for n, t in model.state_dict().items()}
    # The tokenizer as tokenizer.json (+ its config naming eos/bos), in a directory that lives as long as the
    # Checkpoint: writers copy it beside the weights (writers.copy_tokenizer).
    tok_dir = tempfile.TemporaryDirectory(prefix="gguf-tokenizer-")
    tokenizer.save_pretrained(tok_dir.name)
    cfg["data"]["tokenizer_model"] = tok_dir.name
    ck = from_hf_tensors(cfg, {n: (t.dtype, tuple(t.shape), lambda t=t: t) for n, t in state.items()}, str(path))
    ck.keep = tok_dir
    return ck
