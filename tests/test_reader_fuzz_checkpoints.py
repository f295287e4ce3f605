"""The checkpoint readers (safetensors, Hugging Face dirs, DeepSpeed .pt) under the reader fuzz: see
test_reader_fuzz.py for the rule and what each format can detect."""
from __future__ import annotations

import json

import pytest
import torch

# Fixtures are imported by name, which is how pytest finds them in a module; young_gc is autouse.
from reader_fuzz import convert_main, cut, fails, flip, small_cfg, torch_dir, young_gc  # noqa: F401

pytestmark = pytest.mark.usefixtures("corpus")


def test_safetensors_every_cut_and_every_header_flip_leaves_nothing(torch_dir, tmp_path, capfd):
    """tools/convert_checkpoint.py (cherry-convert) from a torch-format dir: each cut of model.safetensors and each
    flip of its length prefix or JSON header is an error, and neither the output nor OUTPUT.partial exists."""
    import shutil

    from cherry_megatron.convert.checkpoint import read_torch

    ck = read_torch(torch_dir)
    assert ck.step == 0 and torch.equal(ck.get("norm.weight"), torch.ones(32))
    data = (torch_dir / "model.safetensors").read_bytes()
    head = 8 + int.from_bytes(data[:8], "little")
    out = tmp_path / "out"
    cases = [("cut", i, cut(data, i)) for i in [*range(0, head, 3), head, head + 5, len(data) - 1]] + \
            [("flip", i, flip(data, i)) for i in range(head)]
    src = tmp_path / "src"
    shutil.copytree(torch_dir, src)
    for kind, at, blob in cases:
        (src / "model.safetensors").write_bytes(blob)
        line = fails(capfd, convert_main, ["--input", str(src), "--input-format", "torch", "--output", str(out),
                                           "--output-format", "deepspeed"])
        assert "truncated or not safetensors" in line, (kind, at, line)
        assert not out.exists() and not out.with_name("out.partial").exists(), (kind, at)
    (src / "model.safetensors").write_bytes(data)
    config = (torch_dir / "cherry_config.json").read_bytes()
    for at in (0, 1, len(config) // 2, len(config) - 1):
        (src / "cherry_config.json").write_bytes(config[:at])
        line = fails(capfd, convert_main, ["--input", str(src), "--input-format", "torch", "--output", str(out),
                                           "--output-format", "torch"])
        assert "cherry_config.json is not valid JSON" in line and not out.exists(), line


def test_hf_dir_cut_safetensors_or_config(tmp_path, capfd):
    from safetensors.torch import save_file

    from cherry_megatron.convert.hf_import import read_hf

    src, out = tmp_path / "hf", tmp_path / "out"
    src.mkdir()
    config = json.dumps({"model_type": "llama", "vocab_size": 16, "hidden_size": 4, "num_hidden_layers": 1,
                         "num_attention_heads": 1, "intermediate_size": 8}).encode()
    (src / "config.json").write_bytes(config)
    save_file({"model.embed_tokens.weight": torch.randn(16, 4), "model.norm.weight": torch.ones(4)},
              str(src / "model.safetensors"))
    assert set(read_hf(src).specs) == {"embed.weight", "norm.weight"}
    data = (src / "model.safetensors").read_bytes()
    argv = ["--input", str(src), "--input-format", "hf", "--output", str(out), "--output-format", "torch"]
    for at in (0, 7, 8, 30, len(data) - 1):
        (src / "model.safetensors").write_bytes(data[:at])
        assert "truncated or not safetensors" in fails(capfd, convert_main, argv)
        assert not out.exists() and not out.with_name("out.partial").exists()
    (src / "model.safetensors").write_bytes(data)
    for at in (0, 1, len(config) - 1):
        (src / "config.json").write_bytes(config[:at])
        assert "is not a Hugging Face model directory" in fails(capfd, convert_main, argv)
    (src / "config.json").write_bytes(b"[1, 2]")
    assert "not a model config" in fails(capfd, convert_main, argv)
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "has no 'num_attention_heads'" in fails(capfd, convert_main, argv)
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_deepspeed_pt_every_cut_leaves_nothing(tmp_path, small_cfg, capfd):
    from cherry_megatron.convert.checkpoint import read_deepspeed

    src, out = tmp_path / "ds", tmp_path / "out"
    src.mkdir()
    pt = src / "mp_rank_00_model_states.pt"
    torch.save({"module": {"embed.weight": torch.randn(16, 4)}, "cherry_config": small_cfg, "step": 3}, pt)
    assert read_deepspeed(src).step == 3
    data = pt.read_bytes()
    argv = ["--input", str(src), "--input-format", "deepspeed", "--output", str(out), "--output-format", "torch"]
    for at in [*range(0, len(data), max(1, len(data) // 150)), len(data) - 1]:
        pt.write_bytes(data[:at])
        line = fails(capfd, convert_main, argv)
        assert f"cannot read {pt} (truncated or not a checkpoint)" in line, (at, line)
        assert not out.exists() and not out.with_name("out.partial").exists(), at
    torch.save([1, 2], pt)  # a valid .pt that is not a model-states dict
    assert "is not a DeepSpeed model-states file" in fails(capfd, convert_main, argv)
