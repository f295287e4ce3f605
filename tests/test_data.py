import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from cherry_megatron.data.indexed import open_indexed, token_stream
from cherry_megatron.errors import DataError
from cherry_megatron.evaluate import window_loss, windows
from conftest import run_cli

DOCS = ["대한민국 국가연구개발사업의 관리 등에 관한 규정.", "Hello, world! 😀 123\n\n  indented line",
        "def f(x):\n    return x ** 2\n"]


def _expected(tokenizer, docs):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    return [sp.encode(d) + [sp.eos_id()] for d in docs], sp


def test_preprocess_jsonl_reads_back_token_for_token(corpus, tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS), encoding="utf-8")
    proc = run_cli(["tools/preprocess_data.py", "--input", str(src), "--tokenizer-model", str(corpus.tokenizer),
                    "--output-prefix", str(tmp_path / "out"), "--workers", "2"])
    assert proc.returncode == 0, proc.stderr
    assert "3 documents" in proc.stdout and "tokens/s" in proc.stdout
    expected, sp = _expected(corpus.tokenizer, DOCS)
    ds = open_indexed(str(tmp_path / "out"))
    assert len(ds) == 3
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
        assert sp.decode(ds[i].tolist()[:-1]) == DOCS[i]  # byte fallback: exact round trip
    assert token_stream(str(tmp_path / "out")).tolist() == sum(expected, [])


def test_preprocess_txt_splits_on_blank_lines(corpus, tmp_path):
    from tools.preprocess_data import main

    src = tmp_path / "docs.txt"
    src.write_text("첫 번째 문서입니다.\n둘째 줄.\n\n두 번째 문서.\n", encoding="utf-8")
    main(["--input", str(src), "--tokenizer-model", str(corpus.tokenizer), "--output-prefix", str(tmp_path / "out"),
          "--workers", "1"])
    ds = open_indexed(str(tmp_path / "out"))
    expected, _ = _expected(corpus.tokenizer, ["첫 번째 문서입니다.\n둘째 줄.", "두 번째 문서."])
    assert [ds[i].tolist() for i in range(len(ds))] == expected


def test_preprocess_missing_input_leaves_nothing(corpus, tmp_path, capsys):
    from tools.preprocess_data import main

    with pytest.raises(SystemExit) as exit_:
        main(["--input", str(tmp_path / "nope.jsonl"), "--tokenizer-model", str(corpus.tokenizer),
              "--output-prefix", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2 and err == [f"error: input file not found: {tmp_path / 'nope.jsonl'}"]
    assert list(tmp_path.iterdir()) == []


def test_missing_and_truncated_files(corpus, tmp_path):
    with pytest.raises(DataError, match="missing data file"):
        open_indexed(str(tmp_path / "absent"))
    prefix = tmp_path / "copy"
    for ext in (".bin", ".idx"):
        shutil.copy(str(corpus.heldout) + ext, str(prefix) + ext)
    open_indexed(str(prefix))
    with open(str(prefix) + ".bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match="truncated data file .*copy.bin"):
        open_indexed(str(prefix))
    with open(str(prefix) + ".idx", "r+b") as f:
        f.truncate(20)
    with pytest.raises(DataError, match="truncated or corrupt index file"):
        open_indexed(str(prefix))


def test_windows_cover_the_stream_in_order():
    assert windows(11, 4, 0) == [(0, 4), (4, 4), (8, 2)]
    assert windows(100, 4, 6) == [(0, 4), (4, 2)]


def test_window_loss_targets_are_the_next_tokens():
    import torch

    from cherry_megatron.losses import Output

    stream = np.arange(50, dtype=np.int64) % 7
    # A "model" whose loss is the target id and which checks inputs precede targets by one.
    def forward(x, y):
        assert torch.equal(x[:, 1:], y[:, :-1])
        return Output(per_token=y.double())
    loss, n = window_loss(forward, stream, seq_length=8, max_tokens=20, batch_size=3, device=torch.device("cpu"))
    assert n == 20 and loss == pytest.approx(stream[1:21].mean())
