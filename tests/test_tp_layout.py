"""One TP layout, read from the parameters themselves (cherry_megatron/model/tp_layout.py): every parameter of
every model kind has an entry, and a real TP=2 model's shards are exactly the slices that entry names."""
import json

import pytest
import torch

from cherry_megatron.config import load_config
from cherry_megatron.model import build_model, layout_table
from conftest import run_cli

KINDS = {
    "dense": ("tiny", []),
    "dense_tied": ("tiny", ["model.tie_embeddings=true"]),
    "recurrent_lora": ("recurrent-tiny", []),
    "moee_mtp": ("tiny", ["moee.num_experts=2", "moee.mtp_depth=1"]),
    "moee_recurrent_lora": ("recurrent-tiny", ["recurrent.lora_rank=4", "moee.num_experts=2", "moee.top_k=2"]),
}
SETS = ["model.vocab_size=1024", "model.num_layers=4"]


@pytest.mark.slow
def test_every_parameter_has_a_layout_that_matches_a_tp2_models_shards(world_of_one, tmp_path):
    saved = {}
    for kind, (preset, sets) in KINDS.items():
        cfg = load_config(preset, SETS + sets)
        torch.manual_seed(0)
        model = build_model(cfg)
        full = {n: p.detach().clone() for n, p in model.named_parameters()}
        table = layout_table(cfg.to_dict())
        assert all(table(n) in (None, (0, 1), (0, 2), (1, 1), (1, 2), (2, 1)) for n in full), kind
        saved[kind] = (preset, SETS + sets, full)
    torch.save(saved, tmp_path / "full.pt")
    proc = run_cli(["-m", "tests.check_tp_layout", str(tmp_path / "full.pt")], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {(r["kind"], r["rank"]) for r in rows} == {(k, r) for k in KINDS for r in (0, 1)}
    for r in rows:
        assert r["params"] == r["full"] and not r["missing"], r  # every parameter of the full model is on each rank
        assert not r["wrong"], r
        assert r["same_as_live"], r  # the table of the meta-device build is the live TP=2 model's
    splits = {s for r in rows for s in r["splits"]}
    # replicated, row/column split, fused (strided) column, and the per-position LoRA stacks
    assert {"null", "[0, 1]", "[0, 2]", "[1, 1]", "[1, 2]", "[2, 1]"} <= splits, splits
