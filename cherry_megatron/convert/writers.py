"""Writers: a `Checkpoint` streamed into the torch, hf or deepspeed format, at a target TP/PP.

Each writer fills a fresh directory (the CLI renames it into place when everything is written) and
touches one full tensor at a time; a DeepSpeed shard file is the largest thing held (torch.save needs
the whole file's dict).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import deepspeed
import torch
from tqdm import tqdm

from cherry_megatron.checkpoint.consolidate import CONSOLIDATED_CONFIG, CONSOLIDATED_WEIGHTS
from cherry_megatron.convert import hf_jetmoe, hf_llama
from cherry_megatron.convert.checkpoint import Checkpoint, routed_experts
from cherry_megatron.convert.safetensors_stream import SafetensorsWriter
from cherry_megatron.errors import CheckpointError
from cherry_megatron.model.tp_layout import tp_slice

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPERTS = ".deepspeed_experts."


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _group(name: str) -> str:
    name = name if isinstance(name, str) else f"layer {name}"
    m = re.match(r"(.*?layers\.\d+)\.", name)
    return m.group(1) if m else name.split(".")[0]


def progress(names, desc: str):
    """One bar per output, its postfix the tensor group (layer) being written."""
    bar = tqdm(list(names), desc=desc, unit="tensor", leave=False, mininterval=0.5)
    for name in bar:
        bar.set_postfix_str(_group(name), refresh=False)
        yield name


def _out_dtype(ck: Checkpoint, dtype: torch.dtype | None, name: str) -> torch.dtype:
    d = ck.specs[name][0]
    return dtype if dtype is not None and d.is_floating_point else d


def write_torch(ck: Checkpoint, out: Path, dtype: torch.dtype | None, final: Path | None = None) -> None:
    specs = [(n, _out_dtype(ck, dtype, n), s) for n, (_, s) in ck.specs.items()]
    w = SafetensorsWriter(out / CONSOLIDATED_WEIGHTS, specs, {"format": "pt", "step": ck.step})
    for name in progress(ck.specs, "torch"):
        w.write(name, cast(ck.get(name), dtype))
    w.close()
    cfg = json.loads(json.dumps(ck.cfg))
    cfg["parallel"].update(tp=1, pp=1)  # the layout of this file; a run loading it sets its own
    copy_tokenizer(cfg, out, final)
    (out / CONSOLIDATED_CONFIG).write_text(json.dumps(cfg, indent=1))


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(cfg: dict, out: Path, final: Path | None) -> bool:
    """A Hugging Face tokenizer (data.tokenizer_model a directory) is copied beside the weights and the config
    pointed at its new home `final` (the output's name once renamed into place): the output carries its
    tokenizer. A sentencepiece model stays where the run's config names it."""
    from cherry_megatron.data.tokenizer import kind, tokenizer_file

    tok = cfg.get("data", {}).get("tokenizer_model") or ""
    if not tok or kind(tok) != "huggingface":
        return False
    if not Path(tokenizer_file(tok)).is_file():
        raise CheckpointError(f"the checkpoint's tokenizer {tok} holds no tokenizer.json")
    src = Path(tokenizer_file(tok)).parent
    for name in HF_TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    cfg["data"]["tokenizer_model"] = str((final or out).resolve())
    return True


def write_hf(ck: Checkpoint, out: Path, dtype: torch.dtype | None, tokenizer: str | None) -> None:
    """A Llama directory (a dense model) or a JetMoe one (a sparse `smoe` model) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads without custom code.
    `tokenizer`: a Hugging Face tokenizer directory (its files copied) or a sentencepiece .model (written as
    tokenizer.model with a LlamaTokenizer config)."""
    arch = hf_jetmoe if ck.cfg.get("smoe", {}).get("num_experts") else hf_llama
    arch.check_exportable(ck.cfg)
    (_write_jetmoe_tensors if arch is hf_jetmoe else _write_llama_tensors)(ck, out, dtype)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    first = next(iter(ck.specs))
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}  # our sentencepiece models' ids
    hf_tokenizer = bool(tokenizer) and copy_tokenizer({"data": {"tokenizer_model": tokenizer}}, out, None)
    if hf_tokenizer:
        from cherry_megatron.data.tokenizer import load_tokenizer

        tok = load_tokenizer(str(out))
        special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eod,
                   "pad_token_id": tok.pad_id if tok.pad_id is not None else tok.eod}
    config = arch.hf_config(ck.cfg, name[_out_dtype(ck, dtype, first)])
    config.update(special)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(special))
    if not hf_tokenizer and tokenizer and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(json.dumps(hf_llama.TOKENIZER_CONFIG, indent=1))
        (out / "special_tokens_map.json").write_text(json.dumps(
            {k: hf_llama.TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}))


def _write_llama_tensors(ck: Checkpoint, out: Path, dtype: torch.dtype | None) -> None:
    specs = []
    for n, (_, shape) in ck.specs.items():
        names = hf_llama.hf_names(n)
        part = (shape[0] // len(names), *shape[1:])
        specs += [(h, _out_dtype(ck, dtype, n), part) for h in names]
    w = SafetensorsWriter(out / "model.safetensors", specs, {"format": "pt"})
    for name in progress(ck.specs, "hf"):
        t = cast(ck.get(name), dtype)
        names = hf_llama.hf_names(name)
        for h, piece in zip(names, torch.chunk(t, len(names), dim=0)):
            w.write(h, piece)
    w.close()


def _write_jetmoe_tensors(ck: Checkpoint, out: Path, dtype: torch.dtype | None) -> None:
    """One JetMoe tensor at a time: a stacked MLP tensor holds every expert's, so it is the largest held."""
    parts: dict[str, dict] = {}  # hf name -> {expert row (None: the whole tensor): our name}
    for n in ck.specs:
        h, row = hf_jetmoe.hf_name(n)
        parts.setdefault(h, {})[row] = n
    names: dict[str, list[str]] = {}  # hf name -> our names, in stack order for a stacked one
    specs = []
    for h, got in parts.items():
        rows = [None] if None in got else sorted(got)
        if rows != [None] and rows != list(range(len(rows))):
            raise CheckpointError(f"{ck.source}: the experts of {h} are not numbered 0..{len(rows) - 1} ({rows})")
        names[h] = [got[r] for r in rows]
        shape = ck.specs[names[h][0]][1]
        specs.append((h, _out_dtype(ck, dtype, names[h][0]), shape if rows == [None] else (len(rows), *shape)))
    w = SafetensorsWriter(out / "model.safetensors", specs, {"format": "pt"})
    for h, (_, _, shape) in zip(progress(names, "hf"), specs):
        ours = [cast(ck.get(n), dtype) for n in names[h]]
        w.write(h, ours[0] if len(shape) == len(ck.specs[names[h][0]][1]) else torch.stack(ours))
    w.close()


# ---------------------------------------------------------------------------------------------- DeepSpeed
def write_deepspeed(ck: Checkpoint, out: Path, tp: int, pp: int, dtype: torch.dtype | None,
                    extra_states: list[str], final: Path | None = None) -> None:
    """Module weights in DeepSpeed's file layout for TP=`tp` x PP=`pp` (what `engine.load_checkpoint(...,
    load_module_only=True)` and `model.init_from` read): `mp_rank_XX_model_states.pt` per TP rank (per
    stage x TP rank with PP, whose weights go to `layer_LL-model_XX-model_states.pt` files as DeepSpeed's
    PipelineModule saves them), routed experts in `layer_K_expert_E_mp_rank_XX_model_states.pt`.
    No optimizer state: a run started from it begins a fresh optimizer (a universal checkpoint keeps it).
    `extra_states`: the `_extra_state` entries megatron's layers expect in a strict load."""

    tag = f"global_step{ck.step}"
    tag_dir = out / tag
    tag_dir.mkdir(parents=True)
    cfg = json.loads(json.dumps(ck.cfg))
    cfg["parallel"].update(tp=tp, pp=pp)
    copy_tokenizer(cfg, out, final)
    experts = [n for n in ck.specs if EXPERTS in n]
    moe_prefixes = list(dict.fromkeys(n.split(EXPERTS)[0] for n in experts))
    meta = {"cherry_config": cfg, "step": ck.step, "global_steps": ck.step, "dp_world_size": 1,
            "mp_world_size": tp * pp, "ds_version": deepspeed.__version__, "optimizer": None,
            "converted_from": ck.source}
    if moe_prefixes:
        meta["num_experts"] = [routed_experts(cfg)] * len(moe_prefixes)
    dense = [n for n in ck.specs if EXPERTS not in n]
    if pp == 1:
        for r in range(tp):
            module = {n: tp_part(ck, n, tp, r, dtype) for n in progress(dense, f"deepspeed tp{r}")}
            module.update({k: None for k in extra_states if EXPERTS not in k})
            torch.save({"module": module, **meta}, tag_dir / f"mp_rank_{r:02d}_model_states.pt")
            _write_experts(ck, tag_dir, experts, moe_prefixes, tp, r, dtype, extra_states)
    else:
        _write_pipeline(ck, tag_dir, dense, tp, pp, dtype, extra_states, meta)
    (out / "latest").write_text(tag)


def tp_part(ck: Checkpoint, name: str, tp: int, rank: int, dtype) -> torch.Tensor:
    t = cast(ck.get(name), dtype)
    layout = ck.layout(name) if tp > 1 else None
    return tp_slice(t, *layout, tp, rank).contiguous() if layout else t.contiguous()


def _write_experts(ck, tag_dir: Path, experts, prefixes, tp: int, r: int, dtype, extra_states) -> None:
    for k, prefix in enumerate(prefixes):
        ids = sorted({int(n.split(EXPERTS)[1].split(".")[0]) for n in experts if n.startswith(prefix + EXPERTS)})
        for e in ids:
            head = f"{prefix}{EXPERTS}{e}."
            sd = {n: tp_part(ck, n, tp, r, dtype) for n in experts if n.startswith(head)}
            sd.update({x: torch.empty(0) for x in extra_states if x.startswith(head)})
            torch.save(sd, tag_dir / f"layer_{k}_expert_{e}_mp_rank_{r:02d}_model_states.pt")


def pipeline_layer(name: str, num_layers: int) -> tuple[int, str]:
    """(DeepSpeed layer index, name inside that layer) of a dense model's tensor, as `build_pipeline` lays
    the model out: 0 the embedding, 1..L the blocks, L+1 the final norm and head."""
    m = re.match(r"layers\.(\d+)\.(.+)", name)
    if m:
        return int(m.group(1)) + 1, "block." + m.group(2)
    return (0, name) if name.startswith("embed.") else (num_layers + 1, name)


def _write_pipeline(ck, tag_dir: Path, names, tp: int, pp: int, dtype, extra_states, meta) -> None:
    cfg = meta["cherry_config"]
    if cfg["recurrent"]["num_blocks"] or routed_experts(cfg):
        raise CheckpointError("--target-pp > 1 is supported for dense models only (recurrent and routed models "
                              "keep their shared blocks in the optimizer state of a pipeline checkpoint)")
    L = cfg["model"]["num_layers"]
    by_layer: dict[int, list[str]] = {}
    for n in list(names) + list(extra_states):
        by_layer.setdefault(pipeline_layer(n, L)[0], []).append(n)
    if cfg["moee"]["mtp_depth"]:  # the MTP head stage holds a copy of the (tied) embedding: saved there too
        by_layer[L + 1].append("embed.weight")
    elif cfg["model"]["tie_embeddings"]:
        # build_pipeline's tied layout: ..., NormStage (L+1), the embedding again as the output layer (L+2),
        # which reads its weight and the head's (weightless) projection; the head's extra state has no stage.
        by_layer[L + 1] = [n for n in by_layer[L + 1] if not n.startswith("head.")]
        by_layer[L + 2] = ["embed.weight"] + [n for n in extra_states if n.startswith("embed.")]
    for r in range(tp):
        for idx in progress(sorted(by_layer), f"deepspeed pipeline tp{r}"):
            sd = {(n if idx == L + 2 else pipeline_layer(n, L)[1]): None if n in extra_states else
                  tp_part(ck, n, tp, r, dtype) for n in by_layer[idx]}
            torch.save(sd, tag_dir / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
    # One metadata file per stage x TP rank, pp-major, as the pipeline engine names them. Layer files go by
    # global layer index, so any partition of the stages (parallel.pipeline_partition) loads them.
    for i in range(pp * tp):
        torch.save({"module": None, **meta}, tag_dir / f"mp_rank_{i:02d}_model_states.pt")
