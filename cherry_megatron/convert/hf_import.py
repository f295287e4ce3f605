"""A Hugging Face Llama or JetMoe directory read as a `Checkpoint` of our dense or sparse (`smoe`) model (a
starting point for training, `model.init_from`, or a distillation teacher): Llama's k/v and gate/up are fused,
JetMoe's stacked MLP experts split into one tensor per expert, on the fly."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from cherry_megatron.convert import hf_jetmoe
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
    jetmoe = hf.get("model_type") == "jetmoe"
    try:
        cfg = (hf_jetmoe.from_hf_config if jetmoe else from_hf_config)(hf, str(path))
    except KeyError as e:  # a Llama or JetMoe config.json always names these sizes
        kind = "JetMoe" if jetmoe else "Llama"
        raise CheckpointError(f"{path}/config.json has no {e} (not a {kind} config)") from None
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no model*.safetensors (pytorch_model.bin is pickle: not loaded)")
    tensors: dict[str, tuple] = {}  # hf name -> (dtype, shape, get)
    try:
        for f in files:
            h = safe_open(str(f), framework="pt")
            for name in h.keys():
                sl = h.get_slice(name)
                # get(row): one expert's row of a stacked tensor, read without the rest of the stack
                tensors[name] = (_st_dtype(sl.get_dtype(), path), tuple(sl.get_shape()),
                                 lambda row=None, h=h, name=name: h.get_tensor(name) if row is None
                                 else h.get_slice(name)[row])
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {f} (truncated or not safetensors): {str(e).splitlines()[0]}") from None
    tokenizer = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path / "tokenizer.model"
    if tokenizer.is_file():
        # The directory is its tokenizer (data/tokenizer.py reads tokenizer.json from it).
        cfg["data"]["tokenizer_model"] = str(path if tokenizer.name == "tokenizer.json" else tokenizer)
    return (from_jetmoe_tensors if jetmoe else from_hf_tensors)(cfg, tensors, str(path))


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
    return Checkpoint(cfg, _model_order(specs), fetch, source)


def _model_order(specs: dict) -> dict:
    order = sorted(specs, key=lambda n: (0, 0) if n == "embed.weight" else
                   (1, int(n.split(".")[1])) if n.startswith("layers.") else (2, 0))
    return {n: specs[n] for n in order}


def from_jetmoe_tensors(cfg: dict, tensors: dict, source: str) -> Checkpoint:
    """A `Checkpoint` of our sparse model over JetMoe-named tensors {hf name: (dtype, shape, get)}: a stacked
    [E, out, in] MLP tensor is E of our tensors, each read as its row when the writer asks for it."""
    num_experts = cfg["smoe"]["num_experts"]
    specs, getters = {}, {}
    for name, (dtype, shape, get) in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        for ours, row in hf_jetmoe.our_names(name, num_experts):
            if row is None:
                specs[ours], getters[ours] = (dtype, shape), get
                continue
            if shape[0] != num_experts:
                raise CheckpointError(f"{source}: {name} stacks {shape[0]} experts, config.json's num_local_experts "
                                      f"is {num_experts}")
            specs[ours], getters[ours] = (dtype, shape[1:]), (lambda get=get, row=row: get(row))
    if cfg["model"]["tie_embeddings"]:
        specs.pop("head.weight", None)
    return Checkpoint(cfg, _model_order(specs), lambda n: getters[n](), source)
