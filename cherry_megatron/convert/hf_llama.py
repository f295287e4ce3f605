"""Our dense model <-> Hugging Face Llama: config fields and tensor names.

Our blocks fuse k|v and gate|up into one column-parallel weight each (layers.py); Llama keeps them apart,
so export splits them along dim 0 and import concatenates. RoPE is the rotate-half convention in both, so
q/k weights need no permutation.
"""
from __future__ import annotations

import re

from cherry_megatron.config import Config
from cherry_megatron.errors import CheckpointError

_FUSED = {"attn.kv.weight": ("self_attn.k_proj.weight", "self_attn.v_proj.weight"),
          "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
_PLAIN = {"attn_norm.weight": "input_layernorm.weight", "attn.q.weight": "self_attn.q_proj.weight",
          "attn.o.weight": "self_attn.o_proj.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
          "mlp.down.weight": "mlp.down_proj.weight"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}


def hf_names(name: str) -> list[str]:
    """Our name -> its Llama name(s): two for a fused weight (its dim-0 halves, in order)."""
    if name in _TOP:
        return [_TOP[name]]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and (m.group(2) in _PLAIN or m.group(2) in _FUSED):
        pre = f"model.layers.{m.group(1)}."
        return [pre + n for n in _FUSED[m.group(2)]] if m.group(2) in _FUSED else [pre + _PLAIN[m.group(2)]]
    raise CheckpointError(f"{name} has no Llama counterpart")


def our_name(hf: str) -> tuple[str, int]:
    """A Llama name -> (our name, which dim-0 part of it: 0 or 1 for fused weights, -1 for a whole one)."""
    for ours, theirs in _TOP.items():
        if hf == theirs:
            return ours, -1
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if m:
        for ours, theirs in _PLAIN.items():
            if m.group(2) == theirs:
                return f"layers.{m.group(1)}.{ours}", -1
        for ours, parts in _FUSED.items():
            if m.group(2) in parts:
                return f"layers.{m.group(1)}.{ours}", parts.index(m.group(2))
    raise CheckpointError(f"{hf} is not a tensor of a Llama model this converter knows")


def check_exportable(cfg: dict) -> None:
    if cfg["recurrent"]["num_blocks"] or cfg["moee"]["num_experts"] or cfg["moee"]["mtp_depth"]:
        kind = "routed (MoEE)" if cfg["moee"]["num_experts"] else "recurrent" if cfg["recurrent"]["num_blocks"] \
            else "multi-token-prediction"
        raise CheckpointError(f"a {kind} model is not exportable as Llama (shared blocks, per-iteration parameters or "
                              "extra heads have no Llama counterpart); convert it to the torch or deepspeed format")


def hf_config(cfg: dict, dtype: str) -> dict:
    m, hidden = cfg["model"], cfg["model"]["hidden_size"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m["vocab_size"], "hidden_size": hidden, "intermediate_size": _ffn(m),
        "num_hidden_layers": m["num_layers"], "num_attention_heads": m["num_heads"],
        "num_key_value_heads": m["num_kv_heads"] or m["num_heads"], "head_dim": m.get("kv_channels") or hidden // m["num_heads"],
        "hidden_act": "silu", "max_position_embeddings": cfg["train"]["seq_length"], "rms_norm_eps": m["norm_eps"],
        "rope_theta": m["rope_theta"], "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": m["tie_embeddings"], "initializer_range": m["init_std"],
        # newer transformers read "dtype", older ones "torch_dtype": both, so either loads the weights as stored
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
    }


def _ffn(m: dict) -> int:
    return m["ffn_hidden_size"] or 64 * -(-(8 * m["hidden_size"] // 3) // 64)


def from_hf_config(hf: dict, source: str) -> dict:
    """Our config (as a dict) for a Llama config.json; anything Llama-like we do not build is refused."""

    arch = hf.get("model_type")
    if arch != "llama":
        raise CheckpointError(f"{source} is a '{arch}' model, not Llama: only Llama and JetMoe checkpoints import")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    refused = {"attention_bias": hf.get("attention_bias", False), "mlp_bias": hf.get("mlp_bias", False),
               "rope_scaling": hf.get("rope_scaling"), "hidden_act": hf.get("hidden_act", "silu") != "silu"}
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise CheckpointError(f"{source}: Llama config with {bad[0]}={hf.get(bad[0])!r} is not supported by our blocks")
    cfg = Config().to_dict()
    cfg["name"] = hf.get("_name_or_path") or "hf-import"
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    cfg["model"].update(vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_hidden_layers"],
                        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                        ffn_hidden_size=hf["intermediate_size"], rope_theta=float(rope),
                        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings")),
                        init_std=hf.get("initializer_range", 0.02),
                        kv_channels=0 if hf.get("head_dim", hidden // heads) == hidden // heads else hf["head_dim"])
    return cfg


TOKENIZER_CONFIG = {
    # Our sentencepiece model, as preprocess_data.py uses it: no BOS, EOS only between documents.
    "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": True,
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False,
}
