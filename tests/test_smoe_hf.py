"""Hugging Face JetMoe in and out of our sparse (`smoe`) models, with transformers as the reference client: a
JetMoeForCausalLM made and saved by transformers imports with its logits, exports back to a directory
transformers loads with our logits and the original tensors, and bad input is one line."""
import json

import pytest
import torch

from conftest import error_lines, run_cli
from test_convert import convert, convert_fails

HF_SIZES = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
                intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)


def jetmoe(path, tie: bool, **overrides):
    """A random JetMoe saved by transformers. Its biases start at zero and its norms at one, which would hide
    a misplaced bias or norm: both randomised."""
    from transformers import JetMoeConfig, JetMoeForCausalLM

    torch.manual_seed(0)
    cfg = JetMoeConfig(**{**HF_SIZES, "rms_norm_eps": 1e-6, "tie_word_embeddings": tie, "initializer_range": 0.1,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}, **overrides})
    hf = JetMoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("tie", [True, False])
def test_jetmoe_imports_and_exports_with_transformers_logits(tmp_path, world_of_one, tie):
    from transformers import JetMoeForCausalLM

    from cherry_megatron.convert.load import load_model

    hf = jetmoe(tmp_path / "hf", tie)
    convert(tmp_path / "hf", "hf", tmp_path / "ours", "torch")
    model, cfg = load_model(tmp_path / "ours")
    assert (cfg.smoe.num_experts, cfg.smoe.top_k, cfg.smoe.attention_experts) == (4, 2, True)
    assert (cfg.model.num_heads, cfg.model.kv_heads, cfg.model.head_dim, cfg.model.ffn_size) == (2, 2, 16, 24)
    assert cfg.model.tie_embeddings == tie and cfg.model.rope_theta == 50000.0 and cfg.model.norm_eps == 1e-6
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    theirs, ours = logits(hf, tokens), logits(model, tokens)
    diff_in = (ours - theirs).abs().max().item()
    assert diff_in < 1e-5, diff_in
    assert theirs.abs().max().item() > 0.1  # not a vanishing signal that any mapping would match

    convert(tmp_path / "ours", "torch", tmp_path / "back", "hf")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["JetMoeForCausalLM"] and config["model_type"] == "jetmoe"
    assert {k: config[k] for k in HF_SIZES} == HF_SIZES and config["tie_word_embeddings"] == tie
    back = JetMoeForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert back.config.rope_parameters["rope_theta"] == 50000.0 and back.config.rms_norm_eps == 1e-6
    diff_out = (logits(back, tokens) - ours).abs().max().item()
    assert diff_out < 1e-5, diff_out
    original, exported = hf.state_dict(), back.state_dict()
    assert original.keys() == exported.keys()
    for k in original:
        assert torch.equal(original[k], exported[k]), k
    print(f"tie={tie}: max |ours - transformers| import {diff_in:.2e}, export {diff_out:.2e}")


def test_rms_norm_eps_is_imported_with_a_warning_when_transformers_ignores_it(tmp_path, capsys):
    """transformers' decoder layers normalise with eps 1e-6 whatever rms_norm_eps says; ours take it for all."""
    from cherry_megatron.convert.hf_import import read_hf

    jetmoe(tmp_path / "hf", True, rms_norm_eps=1e-5)
    capsys.readouterr()
    ck = read_hf(tmp_path / "hf")
    assert ck.cfg["model"]["norm_eps"] == 1e-5
    warning = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: ")]
    assert len(warning) == 1 and "1e-06" in warning[0], warning


@pytest.mark.parametrize("edit, expected", [({"activation_function": "gelu"}, "activation_function='gelu'"),
                                            ({"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                  "rope_theta": 1e4}}, "RoPE scaling 'linear'")])
def test_a_jetmoe_we_do_not_compute_is_refused(tmp_path, capsys, edit, expected):
    jetmoe(tmp_path / "hf", True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **edit}))
    assert expected in convert_fails(capsys, tmp_path / "hf", "hf", tmp_path / "out", "torch")


def test_an_smoe_model_without_attention_experts_is_not_exported(tmp_path, world_of_one):
    """Through the real CLI: JetMoe's attention is always a mixture, so a dense-attention smoe model has none."""
    from cherry_megatron.checkpoint.consolidate import save_consolidated
    from cherry_megatron.config import load_config
    from cherry_megatron.model import build_model

    cfg = load_config("smoe-tiny", ["model.vocab_size=512", "model.hidden_size=32", "model.num_heads=2",
                                    "model.num_kv_heads=2", "model.ffn_hidden_size=24", "model.num_layers=2",
                                    "smoe.num_experts=4", "smoe.attention_experts=false"])
    state = {k: v for k, v in build_model(cfg).state_dict().items()
             if torch.is_tensor(v) and not k.endswith("_extra_state")}
    save_consolidated(tmp_path / "dense-attn", state, cfg.to_dict())
    proc = run_cli(["tools/convert_checkpoint.py", "--input", str(tmp_path / "dense-attn"), "--input-format", "torch",
                    "--output", str(tmp_path / "out"), "--output-format", "hf"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "attention_experts false" in lines[0] and "not exportable as JetMoe" in lines[0], lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
