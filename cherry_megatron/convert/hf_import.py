"""A Hugging Face Llama directory read as a `Checkpoint` of our dense model (a starting point for
training, `model.init_from`, or a distillation teacher): k/v and gate/up are fused on the fly."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from cherry_megatron.convert.checkpoint import Checkpoint, _st_dtype
from cherry_megatron.convert.hf_llama import from_hf_config, our_name
from cherry_megatron.errors import CheckpointError


def read_hf(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a Hugging Face model directory (config.json: {e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}/config.json holds a {type(hf).__name__}, not a model config")
    try:
        cfg = from_hf_config(hf, str(path))
    except KeyError as e:  # a Llama config.json always names these sizes
        raise CheckpointError(f"{path}/config.json has no {e} (not a Llama config)") from None
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no model*.safetensors (pytorch_model.bin is pickle: not loaded)")
    tensors: dict[str, tuple] = {}  # hf name -> (dtype, shape, get)
    try:
        for f in files:
            h = safe_open(str(f), framework="pt")
            for name in h.keys():
                sl = h.get_slice(name)
                tensors[name] = (_st_dtype(sl.get_dtype(), path), tuple(sl.get_shape()),
                                 lambda h=h, name=name: h.get_tensor(name))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {f} (truncated or not safetensors): {str(e).splitlines()[0]}") from None
    tokenizer = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path / "tokenizer.model"
    if tokenizer.is_file():
        # The directory is its tokenizer (data/tokenizer.py reads tokenizer.json from it).
        cfg["data"]["tokenizer_model"] = str(path if tokenizer.name == "tokenizer.json" else tokenizer)
    return from_hf_tensors(cfg, tensors, str(path))


def from_hf_tensors(cfg: dict, tensors: dict, source: str) -> Checkpoint:
    """A `Checkpoint` of our model over Llama-named tensors {hf name: (dtype, shape, get)}: k|v and gate|up
    fused on the fly as the writer asks for them."""
    parts: dict[str, dict[int, tuple]] = {}  # our name -> {part: (dtype, shape, get)}
    for name, entry in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # older exports keep RoPE's buffer; we compute it
            continue
        ours, part = our_name(name)
        parts.setdefault(ours, {})[part] = entry
    if cfg["model"]["tie_embeddings"]:
        parts.pop("head.weight", None)  # some exports store the tied lm_head too

    def fetch(name: str) -> torch.Tensor:
        got = parts[name]
        if -1 in got:
            return got[-1][2]()
        return torch.cat([got[i][2]() for i in (0, 1)], dim=0)

    specs = {}
    for name, got in parts.items():
        if -1 not in got and set(got) != {0, 1}:
            raise CheckpointError(f"{source}: {name} is missing one of its two Llama halves")
        shape = list(next(iter(got.values()))[1])
        shape[0] = sum(e[1][0] for e in got.values())
        specs[name] = (next(iter(got.values()))[0], tuple(shape))
    order = sorted(specs, key=lambda n: (0, 0) if n == "embed.weight" else
                   (1, int(n.split(".")[1])) if n.startswith("layers.") else (2, 0))
    return Checkpoint(cfg, {n: specs[n] for n in order}, fetch, source)
