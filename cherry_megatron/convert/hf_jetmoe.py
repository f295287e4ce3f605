"""Our sparse model (`smoe`, model/smoe.py) <-> Hugging Face JetMoe: config fields and tensor names.

The tensors are the same numbers under other names, with one change of shape: JetMoe keeps each mixture's
MLP experts as one stacked [E, out, in] tensor, DeepSpeed's MoE layer one module (so one tensor) per expert.
Export stacks, import reads expert e's row of the stack. Everything else maps one to one: the MoA experts are
grouped tensors in both, k|v is one fused weight (k rows first) in both, and JetMoe's query-head order
(slot-major, `repeat` of the k/v heads) and ours (kv-head-major, SDPA's GQA) pair each query head with the
same k/v head, so no weight needs permuting.

Norm eps: transformers' JetMoeDecoderLayer builds input_layernorm and post_attention_layernorm with eps 1e-6
whatever `rms_norm_eps` says; only the final norm reads it. Our model has one `model.norm_eps` for every norm.
Import takes `rms_norm_eps` as norm_eps and export writes norm_eps as `rms_norm_eps`, so the config round-trips;
when it is not 1e-6 the two models' layer norms differ by that eps (logits equal only at 1e-6), and both
directions print a warning saying so.

`aux_loss_coef` is not imported: transformers pools every layer's MoA and MLP router logits into one Switch
loss, ours is a loss per router summed over layers (`smoe.load_balance_weight` each), so the coefficients do
not mean the same; an import keeps our (JetMoE paper's) defaults. Export writes load_balance_weight there,
nominally: transformers uses it only when fine-tuning with output_router_logits.
"""
from __future__ import annotations

import re
import sys

from cherry_megatron.config import Config
from cherry_megatron.errors import CheckpointError

HF_LAYER_EPS = 1e-6  # transformers' JetMoeRMSNorm default, which its decoder layers keep
EXPERTS = "mlp.deepspeed_moe.experts.deepspeed_experts."
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight"}
_LAYER = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
          "attn.router.weight": "self_attention.experts.router.layer.weight",
          "attn.q_experts": "self_attention.experts.input_linear.weight",
          "attn.o_experts": "self_attention.experts.output_linear.weight",
          "attn.kv.weight": "self_attention.kv_proj.weight", "attn.bias": "self_attention.experts.bias",
          "mlp.deepspeed_moe.gate.wg.weight": "mlp.router.layer.weight", "mlp.bias": "mlp.bias"}
_STACKED = {"gate_up.weight": "mlp.input_linear.weight", "down.weight": "mlp.output_linear.weight"}


def hf_name(name: str) -> tuple[str, int | None]:
    """Our name -> (its JetMoe tensor, the expert's row of that stack, or None for a whole tensor)."""
    if name in _TOP:
        return _TOP[name], None
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}", None
    e = re.fullmatch(r"layers\.(\d+)\." + re.escape(EXPERTS) + r"(\d+)\.(.+)", name)
    if e and e.group(3) in _STACKED:
        return f"model.layers.{e.group(1)}.{_STACKED[e.group(3)]}", int(e.group(2))
    raise CheckpointError(f"{name} has no JetMoe counterpart")


def our_names(hf: str, num_experts: int) -> list[tuple[str, int | None]]:
    """A JetMoe tensor -> [(our name, its row of the stack or None)]: one entry, or one per expert."""
    for ours, theirs in _TOP.items():
        if hf == theirs:
            return [(ours, None)]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if m:
        for ours, theirs in _LAYER.items():
            if m.group(2) == theirs:
                return [(f"layers.{m.group(1)}.{ours}", None)]
        for ours, theirs in _STACKED.items():
            if m.group(2) == theirs:
                return [(f"layers.{m.group(1)}.{EXPERTS}{e}.{ours}", e) for e in range(num_experts)]
    raise CheckpointError(f"{hf} is not a tensor of a JetMoe model this converter knows")


def warn_eps(eps: float, where: str) -> None:
    if eps != HF_LAYER_EPS:
        print(f"warning: {where}: norm eps {eps:g} is not {HF_LAYER_EPS:g}, which transformers' JetMoe uses inside "
              "every layer whatever rms_norm_eps says (its final norm reads rms_norm_eps); our model uses one eps "
              "for every norm, so its logits differ slightly from transformers'", file=sys.stderr, flush=True)


def check_exportable(cfg: dict) -> None:
    if not cfg["smoe"]["attention_experts"]:
        raise CheckpointError("an smoe model with smoe.attention_experts false (dense attention, routed MLPs) is not "
                              "exportable as JetMoe, whose attention is always a mixture; convert it to the torch or "
                              "deepspeed format")
    if cfg["smoe"]["capacity_factor"]:
        print(f"warning: smoe.capacity_factor={cfg['smoe']['capacity_factor']}: our model drops tokens over capacity, "
              "transformers' JetMoe is dropless; their logits agree only where nothing overflows",
              file=sys.stderr, flush=True)
    warn_eps(cfg["model"]["norm_eps"], "JetMoe export")


def hf_config(cfg: dict, dtype: str) -> dict:
    m, s = cfg["model"], cfg["smoe"]
    hidden, heads = m["hidden_size"], m["num_kv_heads"] or m["num_heads"]
    return {
        "architectures": ["JetMoeForCausalLM"], "model_type": "jetmoe",
        "vocab_size": m["vocab_size"], "hidden_size": hidden, "num_hidden_layers": m["num_layers"],
        "num_key_value_heads": heads, "kv_channels": m.get("kv_channels") or hidden // m["num_heads"],
        "intermediate_size": m["ffn_hidden_size"] or 64 * -(-(8 * hidden // 3) // 64),
        "num_local_experts": s["num_experts"], "num_experts_per_tok": s["top_k"], "activation_function": "silu",
        "max_position_embeddings": cfg["train"]["seq_length"], "rms_norm_eps": m["norm_eps"],
        # transformers >= 5 reads rope_parameters, older ones rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": m["rope_theta"]}, "rope_theta": m["rope_theta"],
        "tie_word_embeddings": m["tie_embeddings"], "initializer_range": m["init_std"],
        "aux_loss_coef": s["load_balance_weight"], "output_router_logits": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "torch_dtype": dtype, "dtype": dtype,
        "use_cache": True,
    }


def from_hf_config(hf: dict, source: str) -> dict:
    """Our config (as a dict) for a JetMoe config.json; what our sparse model does not compute is refused."""
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if rope.get("rope_type", "default") != "default" or scaling:
        kind = rope.get("rope_type") if rope.get("rope_type", "default") != "default" else scaling
        raise CheckpointError(f"{source}: JetMoe config with RoPE scaling {kind!r} is not supported (plain RoPE only)")
    if hf.get("activation_function", "silu") != "silu":
        raise CheckpointError(f"{source}: JetMoe config with activation_function={hf['activation_function']!r} is "
                              "not supported (our experts are SwiGLU: silu)")
    cfg = Config().to_dict()
    cfg["name"] = hf.get("_name_or_path") or "hf-import"
    heads = hf["num_key_value_heads"]
    theta = rope.get("rope_theta") or hf.get("rope_theta") or 10000.0
    cfg["model"].update(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                        num_heads=heads, num_kv_heads=heads, kv_channels=hf["kv_channels"],
                        ffn_hidden_size=hf["intermediate_size"], rope_theta=float(theta),
                        norm_eps=hf.get("rms_norm_eps", HF_LAYER_EPS),
                        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                        init_std=hf.get("initializer_range", 0.01))
    cfg["smoe"].update(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], attention_experts=True)
    warn_eps(cfg["model"]["norm_eps"], source)
    return cfg
