"""Shared by the reader fuzz tests (test_reader_fuzz*.py): running a CLI that must fail cleanly, cutting and
flipping bytes, and the small files every case starts from."""
from __future__ import annotations

import contextlib
import gc
import sys

import numpy as np
import pytest
import torch

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
