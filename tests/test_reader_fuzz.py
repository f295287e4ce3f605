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

import json
import re
import textwrap

import numpy as np
import pytest
import torch

from cherry_megatron.errors import DataError, cli_errors
from conftest import ROOT, error_lines, run_cli
# Fixtures are imported by name, which is how pytest finds them in a module; young_gc is autouse.
from reader_fuzz import (LENGTHS, ODD, convert_main, cut, evaluate_main, fails, flip, indexed,  # noqa: F401
                         small_cfg, torch_dir, train_argv, train_main, unraisable, variant, young_gc)

pytestmark = pytest.mark.usefixtures("corpus")  # the tokenizer the trainer's checks load


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
import reader_fuzz as t
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
