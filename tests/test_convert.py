"""tools/convert_checkpoint.py: exact round trips between formats and layouts, Hugging Face parity, a
universal-checkpoint resume at another TP, and bad input."""
import json
import os

import pytest
import torch

from cherry_megatron.checkpoint.consolidate import load_into, save_consolidated
from cherry_megatron.config import from_dict, load_config
from cherry_megatron.convert.load import load_consolidated, read_any
from cherry_megatron.data.indexed import token_stream
from cherry_megatron.metrics import read_metrics
from cherry_megatron.model import build_model
from conftest import ROOT, SHORT_RUN, error_lines, run_cli, train
from tools.convert_checkpoint import main as convert_main


def convert(src, src_fmt, out, out_fmt, *extra):
    convert_main(["--input", str(src), "--input-format", src_fmt, "--output", str(out), "--output-format", out_fmt,
                  *map(str, extra)])
    return out


def convert_fails(capsys, src, src_fmt, out, out_fmt, *extra) -> str:
    with pytest.raises(SystemExit) as exit_info:
        convert(src, src_fmt, out, out_fmt, *extra)
    assert exit_info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, lines
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return lines[0]


def tensors(path) -> dict:
    ck = read_any(path)
    return {n: ck.get(n) for n in ck.specs}


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def heldout(batch=2, seq=64):
    return torch.as_tensor(token_stream(str(ROOT / "data/tokens/heldout_text_document"))[:batch * seq].astype("int64")).view(batch, seq)


def our_logits(path, tokens):
    state, cfg = load_consolidated(path)
    model = build_model(from_dict(cfg))
    load_into(model, state, str(path))
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def chain(zero3_tp2, tmp_path_factory, world_of_one):
    """deepspeed (TP=2, ZeRO-3) -> torch -> hf -> deepspeed (TP=1) -> deepspeed (TP=2)."""
    d = tmp_path_factory.mktemp("chain")
    convert(zero3_tp2, "deepspeed", d / "torch", "torch")
    convert(d / "torch", "torch", d / "hf", "hf")
    convert(d / "hf", "hf", d / "ds1", "deepspeed")
    convert(d / "ds1", "deepspeed", d / "ds2", "deepspeed", "--target-tp", 2)
    return d


@pytest.mark.slow
def test_zero3_tp2_through_torch_hf_and_back_is_bit_identical(zero3_tp2, chain):
    source = tensors(zero3_tp2)
    assert len(source) == 17 and all(t.dtype == torch.float32 for t in source.values())
    for step in ("torch", "hf", "ds1", "ds2"):
        assert_bit_identical(tensors(chain / step), source)
    # the TP=2 output holds each rank's own slices, as DeepSpeed writes them
    tag = chain / "ds2" / (chain / "ds2" / "latest").read_text()
    ranks = [torch.load(tag / f"mp_rank_0{r}_model_states.pt", weights_only=True)["module"] for r in (0, 1)]
    q = source["layers.0.attn.q.weight"]
    assert torch.equal(torch.cat([r["layers.0.attn.q.weight"] for r in ranks]), q)
    kv = source["layers.0.attn.kv.weight"]  # [k; v], each rank holding [k_r; v_r]
    k, v = kv.chunk(2)
    assert torch.equal(ranks[1]["layers.0.attn.kv.weight"], torch.cat([k.chunk(2)[1], v.chunk(2)[1]]))
    assert json.loads((chain / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_hf_export_loads_in_transformers_with_our_logits_and_tokenizer(chain, corpus):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = heldout()
    hf = AutoModelForCausalLM.from_pretrained(chain / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        theirs = hf(tokens).logits
    ours = our_logits(chain / "torch", tokens)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-4
    text = json.loads((corpus.corpus / "heldout.jsonl").read_text().splitlines()[0])["text"][:2000]
    sp = spm.SentencePieceProcessor(model_file=str(corpus.tokenizer))
    assert AutoTokenizer.from_pretrained(chain / "hf")(text)["input_ids"] == sp.encode(text)


def test_a_llama_saved_by_transformers_imports_with_equal_logits(tmp_path, world_of_one):
    """Import is not only our own export read back: a Llama made and saved by transformers itself (GQA, tied
    embeddings, its own rms_norm_eps and rope_theta)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=50000.0, tie_word_embeddings=True)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    convert(tmp_path / "llama", "hf", tmp_path / "ours", "torch")
    tokens = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert (our_logits(tmp_path / "ours", tokens) - theirs).abs().max().item() < 1e-4
    # --dtype casts on the way out (a bf16 export for GPUs), rounding exactly as torch does
    convert(tmp_path / "ours", "torch", tmp_path / "bf16", "torch", "--dtype", "bf16")
    fp32, bf16 = tensors(tmp_path / "ours"), tensors(tmp_path / "bf16")
    assert_bit_identical(bf16, {k: t.to(torch.bfloat16) for k, t in fp32.items()})


@pytest.mark.slow
def test_resharding_tp_1_2_4_and_pp_1_2_keeps_logits(corpus, tmp_path, world_of_one):
    """TP=1 -> TP=4 -> TP=2 -> TP=2 x PP=2 -> TP=1 x PP=2, each loaded by 4 real ranks at its own layout
    (TP ranks strictly from their own file, pipelines by DeepSpeed's PipelineModule.load_state_dir)."""
    cfg = load_config("tiny", ["model.num_layers=2", "model.num_kv_heads=4", "model.vocab_size=8192"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_consolidated(tmp_path / "tp1", {k: v for k, v in model.state_dict().items()
                                         if torch.is_tensor(v) and not k.endswith("_extra_state")}, cfg.to_dict())
    tokens = heldout()
    with torch.no_grad():
        torch.save({"tokens": tokens, "logits": model(tokens).logits}, tmp_path / "reference.pt")
    convert(tmp_path / "tp1", "torch", tmp_path / "4x1", "deepspeed", "--target-tp", 4)
    convert(tmp_path / "4x1", "deepspeed", tmp_path / "2x1", "deepspeed", "--target-tp", 2)
    convert(tmp_path / "2x1", "deepspeed", tmp_path / "2x2", "deepspeed", "--target-tp", 2, "--target-pp", 2)
    convert(tmp_path / "2x2", "deepspeed", tmp_path / "1x2", "deepspeed", "--target-pp", 2)
    convert(tmp_path / "1x2", "deepspeed", tmp_path / "back", "torch")
    assert_bit_identical(tensors(tmp_path / "back"), tensors(tmp_path / "tp1"))
    layouts = [f"{name}={tmp_path / name}" for name in ("4x1", "2x1", "2x2", "1x2")]
    proc = run_cli(["-m", "tests.check_convert", str(tmp_path / "reference.pt"), *layouts], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    last = [r for r in rows if r["max_abs_diff"] is not None]  # TP ranks of the last stage
    assert sorted({r["layout"] for r in last}) == ["1x2", "2x1", "2x2", "4x1"] and len(last) == 4 + 4 + 2 + 2
    assert max(r["max_abs_diff"] for r in last) < 1e-5, last


@pytest.mark.slow
def test_universal_resume_at_another_tp_continues_the_curve(baseline, tmp_path, capsys):
    """The TP=1 baseline's step-3 checkpoint as a universal one, resumed at TP=2 with its optimizer state:
    steps 4-6 are the uninterrupted run's (a fresh optimizer would not give them)."""
    convert(baseline / "checkpoints" / "global_step3", "deepspeed", tmp_path / "universal", "universal")
    run = tmp_path / "tp2"
    proc = train(run, ["parallel.tp=2", f"train.universal_from={tmp_path / 'universal'}"], nproc=2)
    assert "start_step=3" in proc.stdout

    def curve(run_dir, key):
        return {r["step"]: r[key] for r in read_metrics(run_dir) if r.get(key) is not None}

    ref = curve(baseline, "loss")
    resumed = curve(run, "loss")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(ref[step], rel=1e-4), step
    assert curve(run, "eval_loss")[6] == pytest.approx(curve(baseline, "eval_loss")[6], rel=1e-4)
    # another run's config is refused in one line, before any process group starts
    from cherry_megatron.train import main as train_main

    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", "tiny", "--run-dir", str(tmp_path / "other"), "--set", *SHORT_RUN,
                    "model.hidden_size=128", f"train.universal_from={tmp_path / 'universal'}"])
    assert exit_info.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "only the parallel layout may change" in err[0], err


def test_recurrent_and_routed_round_trip_exactly(tmp_path, world_of_one, capsys):
    """A recurrent model with per-position LoRA and a routed one with MTP: torch -> deepspeed TP=2 ->
    torch is bit-identical (experts in DeepSpeed's per-expert files); neither exports as Llama."""
    for name, preset, sets in (("recurrent", "recurrent-tiny", ["recurrent.lora_rank=4"]),
                               ("moee", "recurrent-tiny", ["moee.num_experts=2", "moee.mtp_depth=1"])):
        cfg = load_config(preset, ["model.vocab_size=1024", "model.num_layers=4", *sets])
        torch.manual_seed(0)
        model = build_model(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
        save_consolidated(tmp_path / name, state, cfg.to_dict())
        convert(tmp_path / name, "torch", tmp_path / f"{name}-tp2", "deepspeed", "--target-tp", 2)
        convert(tmp_path / f"{name}-tp2", "deepspeed", tmp_path / f"{name}-back", "torch")
        assert_bit_identical(tensors(tmp_path / f"{name}-back"), state)
        line = convert_fails(capsys, tmp_path / name, "torch", tmp_path / f"{name}-hf", "hf")
        assert "not exportable as Llama" in line
    tag = tmp_path / "moee-tp2" / "global_step0"
    assert sorted(p.name for p in tag.glob("layer_*_expert_*"))[:2] == ["layer_0_expert_0_mp_rank_00_model_states.pt",
                                                                       "layer_0_expert_0_mp_rank_01_model_states.pt"]


class Evil:
    def __reduce__(self):
        return os.system, (f"touch {os.environ.get('CHERRY_EVIL_MARKER', '/tmp/cherry-evil')}",)


def test_bad_input_is_one_error_line_and_leaves_nothing(baseline, tmp_path, capsys, world_of_one, monkeypatch):
    src = baseline / "checkpoints" / "global_step6"
    out = tmp_path / "out"
    assert "unknown --output-format 'onnx'" in convert_fails(capsys, src, "deepspeed", out, "onnx")
    assert "unknown --input-format" in convert_fails(capsys, src, "megatron", out, "torch")
    assert "does not divide the attention heads" in convert_fails(capsys, src, "deepspeed", out, "deepspeed",
                                                                  "--target-tp", 3)
    # a truncated shard
    bad = tmp_path / "truncated"
    bad.mkdir()
    data = (src / "mp_rank_00_model_states.pt").read_bytes()
    (bad / "mp_rank_00_model_states.pt").write_bytes(data[: len(data) // 2])
    assert "truncated or not a checkpoint" in convert_fails(capsys, bad, "deepspeed", out, "torch")
    # another architecture: a Hugging Face GPT-2 directory, and tensors that do not fit their config
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    (tmp_path / "gpt2" / "model.safetensors").write_bytes(b"")
    assert "not Llama" in convert_fails(capsys, tmp_path / "gpt2", "hf", out, "torch")
    state, cfg = load_consolidated(src)
    cfg["model"]["num_layers"] = 4
    save_consolidated(tmp_path / "mismatch", state, cfg)
    assert "does not match the model its config describes" in convert_fails(capsys, tmp_path / "mismatch", "torch",
                                                                            out, "deepspeed")
    # pickled code is refused, never run
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CHERRY_EVIL_MARKER", str(marker))
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"module": {}, "cherry_config": Evil()}, evil / "mp_rank_00_model_states.pt")
    assert "pickled code" in convert_fails(capsys, evil, "deepspeed", out, "torch")
    assert not marker.exists()
    # the CLI contract in a real process: exit 2, one line, stdout empty
    proc = run_cli(["tools/convert_checkpoint.py", "--input", str(src), "--input-format", "deepspeed", "--output",
                    str(out), "--output-format", "deepspeed", "--target-tp", "3"])
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and not out.exists() and proc.stdout == ""


@pytest.mark.slow
def test_universal_resume_of_a_tied_embedding_model_continues_the_curve(corpus, tmp_path):
    """Tied input/output embeddings (as SmolLM2 has) through a universal checkpoint: the step-3 state of a TP=1
    run resumed at TP=2 repeats the uninterrupted run's steps 4-6."""
    tied = ["model.tie_embeddings=true"]
    whole = tmp_path / "whole"
    train(whole, tied)
    convert(whole / "checkpoints" / "global_step3", "deepspeed", tmp_path / "universal", "universal")
    run = tmp_path / "tp2"
    proc = train(run, [*tied, "parallel.tp=2", f"train.universal_from={tmp_path / 'universal'}"], nproc=2)
    assert "start_step=3" in proc.stdout
    ref = {r["step"]: r["loss"] for r in read_metrics(whole) if r.get("loss") is not None}
    resumed = {r["step"]: r["loss"] for r in read_metrics(run) if r.get("loss") is not None}
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(ref[step], rel=1e-4), step
