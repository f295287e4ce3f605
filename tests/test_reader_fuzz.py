"""Every reader of untrusted files, fed cut and byte-flipped copies through the CLIs that use it: exit 2, one
`error:` line, nothing written, and no traceback on stderr, not even the "Exception ignored in ... __del__" that
a half-built object prints when it is collected (megatron's IndexedDataset did, under a cut .idx header).

A flip here is one byte XOR 0xFF. What each format can detect, and so what is asserted:
  .idx         everything: the header's magic, version and dtype, its counts against the file size, the lengths
               against the pointers (their running sum), the document bounds (rising from 0 to the count), and the
               .bin's size against the index. Every cut and every flip is an error.
  .bin         every cut (the index gives its size). A flipped token is another token unless it leaves the
               vocabulary: for uint16 ids below 256 the high byte's flip does (error in evaluate, which checks the
               ids against the model), the low byte's does not: NOT detectable.
  safetensors  every cut; every flip in the 8-byte length and the JSON header (0xFF never makes valid UTF-8).
               A single-bit flip there can still be valid JSON (a renamed tensor, another metadata value), and the
               tensor data carries no checksum: a flip in the data is NOT detectable.
  .pt          every cut (the zip's central directory is at the end). Flips are not asserted: torch does not
               verify the zip's CRCs, so a flip in tensor data or in a pickled string loads (most flips do).
  YAML         a cut inside a key is an error; a cut at a line end or inside a value (steps: 100 -> 10) is a
               shorter valid config: NOT detectable. Every flip of this ASCII file is (no longer UTF-8).
  tokenizer    every cut, including one on a protobuf field boundary (a valid but incomplete ModelProto). A flip
               usually changes a piece or a score: NOT detectable; flips are asserted only to never trace back.
"""
from __future__ import annotations

import contextlib
import gc
import json
import re
import sys
import textwrap

import numpy as np
import pytest
import torch

from cherry_megatron.errors import DataError, cli_errors
from conftest import ROOT, error_lines, run_cli

pytestmark = pytest.mark.usefixtures("corpus")  # the tokenizer the trainer's checks load

ODD = ("Traceback", "Exception ignored")


@contextlib.contextmanager
def unraisable():
    """What `__del__` methods raise in this block, collected (pytest's own hook only warns)."""
    seen = []
    saved, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        yield seen
    finally:
        gc.collect()
        sys.unraisablehook = saved


@pytest.fixture(scope="module", autouse=True)
def young_gc():
    """A full gc.collect() over a heap holding torch, megatron and DeepSpeed takes ~0.5 s: each case collects only
    what it allocated, older survivors being frozen out of the collector's reach (fails), until the end, when
    they are thawed and collected under the same check."""
    gc.collect()
    gc.freeze()
    yield
    with unraisable() as raised:
        gc.unfreeze()
    assert not raised, [f"{type(u.exc_value).__name__}: {u.exc_value} in {u.object}" for u in raised]


def fails(capfd, main, argv) -> str:
    """`main(argv)` exits 2 with one `error:` line and no traceback, even once collected."""
    with unraisable() as raised:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        code = exit_info.value.code
        del exit_info  # holds the exception chain, and through its frames any half-built object
    gc.freeze()
    out, err = capfd.readouterr()
    assert not raised, [f"{type(u.exc_value).__name__}: {u.exc_value} in {u.object}" for u in raised]
    assert code == 2, (code, out, err)
    assert not any(w in out + err for w in ODD), out + err
    if main is not train_main:  # evaluate and convert keep stdout for their result (the trainer lets DeepSpeed's
        assert out == "", out   # import-time warning through)
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def cut(data: bytes, at: int) -> bytes:
    return data[:at]


def flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


def train_main(argv):
    from cherry_megatron.train import main

    main(argv)


def evaluate_main(argv):
    from cherry_megatron.evaluate import main

    main(argv)


def convert_main(argv):
    from cherry_megatron.cli.convert import main

    main(argv)


def train_argv(run_dir, *sets) -> list[str]:
    return ["--config", "tiny", "--run-dir", str(run_dir), "--set", "data.eval_path=", *sets]


# --------------------------------------------------------------------------------------------------- fixtures
LENGTHS = [7, 3, 12, 1, 9]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A .bin/.idx pair as megatron writes it: 5 documents of uint16 ids in 1..199 (high byte 0)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    d = tmp_path_factory.mktemp("indexed")
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 200, sum(LENGTHS))
    builder = IndexedDatasetBuilder(str(d / "ok.bin"), dtype=np.uint16)
    for doc in np.split(tokens, np.cumsum(LENGTHS)[:-1]):
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(str(d / "ok.idx"))
    return d, tokens, (d / "ok.idx").read_bytes(), (d / "ok.bin").read_bytes()


def variant(d, name: str, idx: bytes, bin_: bytes) -> str:
    prefix = d / name  # a file per case: an earlier case's memory map never sees a later one's bytes
    (d / f"{name}.idx").write_bytes(idx)
    (d / f"{name}.bin").write_bytes(bin_)
    return str(prefix)


SMALL = ["model.vocab_size=1024", "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2",
         "model.num_kv_heads=1", "model.ffn_hidden_size=64"]


@pytest.fixture(scope="module")
def small_cfg() -> dict:
    from cherry_megatron.config import load_config

    return load_config("tiny", SMALL).to_dict()


@pytest.fixture(scope="module")
def torch_dir(tmp_path_factory, small_cfg, world_of_one):
    """A torch-format checkpoint (model.safetensors + cherry_config.json) of a one-layer model evaluate can load
    (it checks the token ids against the vocabulary once the model is built)."""
    from cherry_megatron.checkpoint.consolidate import save_consolidated
    from cherry_megatron.config import from_dict
    from cherry_megatron.model import build_model

    d = tmp_path_factory.mktemp("torchfmt") / "ck"
    torch.manual_seed(0)
    state = build_model(from_dict(small_cfg)).state_dict()
    save_consolidated(d, {k: v for k, v in state.items() if torch.is_tensor(v) and not k.endswith("_extra_state")},
                      small_cfg)
    return d


# ------------------------------------------------------------------------------------------------------ tests
def test_the_check_sees_a_del_that_fails_at_collection(capfd):
    """fails() must catch what the original bug printed: an __init__ that raises before setting what __del__
    deletes (IndexedDataset and `self.index`), reported only when the object is collected."""
    class HalfBuilt:
        def __init__(self):
            raise ValueError("cut header")

        def __del__(self):
            del self.index

    def main(argv):
        with cli_errors():
            try:
                HalfBuilt()
            except ValueError as e:
                raise DataError(str(e)) from None

    with pytest.raises(AssertionError, match="AttributeError"):
        fails(capfd, main, [])


def test_idx_every_cut_and_every_flip_is_one_error_line(indexed, tmp_path, capfd):
    """Through the trainer's data check (train.main), before anything is written."""
    from cherry_megatron.data.indexed import token_stream

    d, tokens, idx, bin_ = indexed
    assert np.array_equal(token_stream(str(d / "ok")), tokens)  # the intact pair reads back
    n = len(LENGTHS)
    header, arrays = 34, 34 + 12 * n + 8 * (n + 1)
    assert len(idx) == arrays
    cuts = [*range(header + 1), header + 2, header + 4 * n - 1, header + 4 * n + 5, header + 12 * n + 3, arrays - 1]
    run = tmp_path / "run"
    for name, data in [(f"cut{i}", cut(idx, i)) for i in cuts] + [(f"flip{i}", flip(idx, i)) for i in range(len(idx))]:
        prefix = variant(d, name, data, bin_)
        line = fails(capfd, train_main, train_argv(run, f"data.paths={prefix}"))
        assert f"truncated or corrupt index file {prefix}.idx" in line or \
            f"data file {prefix}.bin" in line, (name, line)  # a length flip can leave the .bin the wrong size
        assert not run.exists(), name


def test_bin_cuts_and_out_of_vocabulary_flips_in_evaluate(indexed, torch_dir, capfd):
    """evaluate reads the checkpoint, then the data: a cut .bin or .idx and a token id beyond the model's
    vocabulary (a flipped high byte) are errors; a flipped low byte is another valid token: not detectable."""
    from cherry_megatron.data.indexed import token_stream

    d, tokens, idx, bin_ = indexed
    for name, data in [("bcut0", b""), ("bcut1", bin_[:1]), ("bcuthalf", bin_[:len(bin_) // 2]),
                       ("bcutend", bin_[:-1]), ("blong", bin_ + b"\0")]:
        prefix = variant(d, name, idx, data)
        line = fails(capfd, evaluate_main, ["--load", str(torch_dir), "--data", prefix])
        assert f"data file {prefix}.bin" in line, (name, line)
    for at in (0, 20, len(idx) - 1):
        prefix = variant(d, f"ecut{at}", idx[:at], bin_)
        assert f"truncated or corrupt index file {prefix}.idx" in fails(
            capfd, evaluate_main, ["--load", str(torch_dir), "--data", prefix])
    for at in range(1, len(bin_), 2):  # little-endian uint16: odd bytes are high bytes
        prefix = variant(d, f"bflip{at}", idx, flip(bin_, at))
        line = fails(capfd, evaluate_main, ["--load", str(torch_dir), "--data", prefix])
        assert "beyond the model's vocabulary 1024" in line, line
    low = token_stream(variant(d, "lowflip", idx, flip(bin_, 4)))
    assert (low != tokens).sum() == 1 and low[2] == tokens[2] ^ 0xFF  # read as a valid token


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


YAML = """\
data:
  paths: [{absent}]
  tokenizer_model: {tokenizer}
model:
  hidden_size: 128
train:
  steps: 100
  lr: 3.0e-4
base: tiny
"""


def test_yaml_cuts_inside_keys_and_every_flip_are_config_errors(tmp_path, capfd):
    """data: comes first and names a missing prefix, so any prefix of the file that is a valid config (NOT
    detectable: a cut at a line end, or `steps: 100` cut to `steps: 10`) still stops at the data check, before
    anything is written; a cut inside a key and any flip must stop at the config."""
    text = YAML.format(absent=tmp_path / "absent", tokenizer=ROOT / "data/tokenizer/cherry_ko8k.model")
    path, run = tmp_path / "cfg.yaml", tmp_path / "run"
    inside_keys = {i for m in re.finditer(r"^ *([a-z_]+):", text, re.M) for i in range(m.start(1) + 1, m.end(1) + 1)}
    data = text.encode()
    for at in range(len(data)):
        path.write_bytes(data[:at])
        line = fails(capfd, train_main, ["--config", str(path), "--run-dir", str(run)])
        if at in inside_keys:
            assert str(path) in line or "config key" in line, (at, line)
        assert not run.exists()
    for at in range(len(data)):
        path.write_bytes(flip(data, at))
        line = fails(capfd, train_main, ["--config", str(path), "--run-dir", str(run)])
        assert f"{path} is not UTF-8 text" in line, (at, line)
    path.write_bytes(data)
    assert "missing data file" in fails(capfd, train_main, ["--config", str(path), "--run-dir", str(run)])
    assert not run.exists()


def test_tokenizer_every_cut_is_an_error_and_flips_never_trace_back(corpus, tmp_path, capfd):
    from sentencepiece import sentencepiece_model_pb2

    from cherry_megatron.data.tokenizer import load_tokenizer

    data = corpus.tokenizer.read_bytes()
    # The ModelProto's top-level field boundaries, by protobuf itself: a cut there parses.
    full, part = sentencepiece_model_pb2.ModelProto(), sentencepiece_model_pb2.ModelProto()
    full.ParseFromString(data)
    part.pieces.extend(full.pieces[:100])
    boundaries = [len(part.SerializeToString())]
    part.pieces.extend(full.pieces[100:])
    boundaries.append(len(part.SerializeToString()))  # before the trainer spec
    part.trainer_spec.CopyFrom(full.trainer_spec)
    boundaries.append(len(part.SerializeToString()))  # before the normalizer spec
    assert boundaries[-1] < len(data)
    tok_path, run = tmp_path / "cut.model", tmp_path / "run"
    for at in [*range(64), *range(64, len(data), 4999), *boundaries, len(data) - 1]:
        tok_path.write_bytes(data[:at])
        line = fails(capfd, train_main, train_argv(run, f"data.tokenizer_model={tok_path}",
                                                   f"data.paths={tmp_path / 'absent'}"))
        assert f"cannot load sentencepiece model {tok_path}" in line, (at, line)
        assert not run.exists()
    for at in [*range(0, 64, 3), *range(64, len(data), 9973)]:
        tok_path.write_bytes(flip(data, at))
        with unraisable() as raised:
            try:
                load_tokenizer(str(tok_path))
            except DataError as e:
                assert "cannot load sentencepiece model" in str(e)
        assert not raised
        assert not any(w in capfd.readouterr().err for w in ODD)


# ------------------------------------------------------------------------------------ real processes (2 of them)
def test_real_trainer_on_a_cut_idx_header(indexed, tmp_path):
    d, _, idx, bin_ = indexed
    prefix = variant(d, "proc_cut20", idx[:20], bin_)
    run = tmp_path / "run"
    proc = run_cli(["-m", "cherry_megatron.train", *train_argv(run, f"data.paths={prefix}")])
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc) == [f"error: truncated or corrupt index file {prefix}.idx: "
                                 "20 bytes, shorter than the 34-byte header"], proc.stderr
    assert not any(w in proc.stderr for w in ODD), proc.stderr
    assert not run.exists()


FAMILIES = """
import json, sys
sys.path.insert(0, "tests")
import test_reader_fuzz as t
cases = json.loads(sys.argv[1])
kept = []  # the exits stay alive to interpreter shutdown, as a CLI's own exit does
for fn, argv in cases:
    try:
        getattr(t, fn)(argv)
    except SystemExit as e:
        kept.append(e)
print(json.dumps([e.code for e in kept]))
"""


def test_every_reader_family_in_one_real_process(indexed, torch_dir, tmp_path):
    """One failing case per reader family in a real interpreter, kept until shutdown: finalizers run there, and
    what they print goes to the real stderr."""
    d, _, idx, bin_ = indexed
    ds = tmp_path / "ds"
    ds.mkdir()
    torch.save({"module": {}, "cherry_config": {}}, ds / "mp_rank_00_model_states.pt")
    pt = (ds / "mp_rank_00_model_states.pt").read_bytes()
    (ds / "mp_rank_00_model_states.pt").write_bytes(pt[:len(pt) // 2])
    st = tmp_path / "st"
    st.mkdir()
    (st / "cherry_config.json").write_bytes((torch_dir / "cherry_config.json").read_bytes())
    (st / "model.safetensors").write_bytes((torch_dir / "model.safetensors").read_bytes()[:40])
    (tmp_path / "cut.yaml").write_bytes(b"model:\n  hidden_si: 1\n")
    (tmp_path / "cut.model").write_bytes((ROOT / "data/tokenizer/cherry_ko8k.model").read_bytes()[:-1])
    run, out = tmp_path / "run", tmp_path / "out"
    cases = [
        ("train_main", train_argv(run, f"data.paths={variant(d, 'proc_arrays', idx[:50], bin_)}")),
        ("evaluate_main", ["--load", str(torch_dir), "--data", variant(d, "proc_bin", idx, bin_[:-1])]),
        ("convert_main", ["--input", str(st), "--input-format", "torch", "--output", str(out),
                          "--output-format", "torch"]),
        ("convert_main", ["--input", str(ds), "--input-format", "deepspeed", "--output", str(out),
                          "--output-format", "torch"]),
        ("train_main", ["--config", str(tmp_path / "cut.yaml"), "--run-dir", str(run)]),
        ("train_main", train_argv(run, f"data.tokenizer_model={tmp_path / 'cut.model'}")),
    ]
    proc = run_cli(["-c", textwrap.dedent(FAMILIES), json.dumps(cases)])
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[-1]) == [2] * len(cases), proc.stderr
    lines = error_lines(proc)
    assert len(lines) == len(cases), proc.stderr
    for line, want in zip(lines, ["truncated or corrupt index file", "truncated data file", "not safetensors",
                                  "truncated or not a checkpoint", "unknown config key 'model.hidden_si'",
                                  "cannot load sentencepiece model"]):
        assert want in line, (want, line)
    assert not any(w in proc.stderr for w in ODD), proc.stderr
    assert not run.exists() and not out.exists() and not out.with_name("out.partial").exists()
