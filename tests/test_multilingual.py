"""The shipped multilingual corpus (`make data`: tools/build_multilingual.py), the balanced tokenizer sample
(cherry-train-tokenizer --balance) and per-language fertility (cherry-tokenizer-report)."""
from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT, error_lines, run_cli

ML = ROOT / "data" / "multilingual"


@pytest.fixture(scope="module")
def corpus():
    if not (ML / ".built").exists():
        pytest.fail("the multilingual corpus is missing: run `make data` (make test does it)")
    docs = {split: [json.loads(line) for line in (ML / "corpus" / f"{split}.jsonl").open(encoding="utf-8")]
            for split in ("train", "heldout")}
    return docs


def test_the_corpus_has_eight_or_more_languages_of_very_different_sizes_plus_code(corpus):
    from cherry_megatron.data.blend import token_count
    from cherry_megatron.data.indexed import read_meta

    langs = sorted({d["lang"] for d in corpus["train"]})
    natural = [lang for lang in langs if lang != "code"]
    assert "code" in langs and len(natural) >= 8
    assert {d["lang"] for d in corpus["heldout"]} == set(langs)
    sizes = {}
    for lang in langs:
        for split in ("train", "heldout"):
            prefix = ML / "tokens" / f"{split}_{lang}_text_document"
            assert read_meta(str(prefix))["tokenizer"].endswith("multi8k.model")
        sizes[lang] = token_count(str(ML / "tokens" / f"train_{lang}_text_document"))
    assert max(sizes[lang] for lang in natural) > 10 * min(sizes[lang] for lang in natural)
    # Every language's documents are the .bin's documents, in order, one EOD each.
    from cherry_megatron.data.indexed import open_indexed

    for lang in ("fa", "en"):
        n = sum(1 for d in corpus["train"] if d["lang"] == lang)
        assert len(open_indexed(str(ML / "tokens" / f"train_{lang}_text_document")).document_indices) - 1 == n
    # No document on both sides of the split; the sources are recorded with version and licence.
    assert not {d["text"] for d in corpus["train"]} & {d["text"] for d in corpus["heldout"]}
    sources = (ROOT / "data" / "SOURCES.md").read_text()
    for lang in langs:
        assert re.search(rf"^\| {lang} \| [\w.-]+ \| [\w.+~:-]+ \| (CC-BY-SA-3.0|PSF-2.0) \|", sources, re.M), lang


def test_translations_leave_out_the_untranslated_english(corpus):
    english = {p for d in corpus["train"] + corpus["heldout"] if d["lang"] == "en" and d["source"] == "gnome-user-docs"
               for p in d["text"].split("\n")}
    for d in corpus["train"]:
        if d["lang"] not in ("en", "code"):
            assert not english & set(d["text"].split("\n")), d["lang"]
    fa = "".join(d["text"] for d in corpus["train"] if d["lang"] == "fa")
    assert "\u200c" in fa  # the Persian zero-width non-joiner survives the cleaning


def test_fertility_per_language_equals_a_count_by_hand(corpus):
    import sentencepiece as spm

    from cherry_megatron.cli.tokenizer_report import main

    model = ML / "tokenizer" / "multi8k.model"
    [result] = main(["--tokenizer", str(model), "--input", str(ML / "corpus" / "heldout.jsonl"), "--max-chars", "0"])
    sp = spm.SentencePieceProcessor(model_file=str(model))
    langs = sorted({d["lang"] for d in corpus["heldout"]})
    assert sorted(result["languages"]) == langs
    for lang in langs:
        texts = [d["text"] for d in corpus["heldout"] if d["lang"] == lang]
        chars, tokens = sum(map(len, texts)), sum(len(sp.encode(t)) for t in texts)
        assert result["languages"][lang] == {"chars": chars, "tokens": tokens, "chars_per_token": chars / tokens}
    # The balanced tokenizer does not spell any language in bytes.
    assert min(r["chars_per_token"] for r in result["languages"].values()) > 1.0


def test_the_tokenizer_samples_each_language_by_the_blend_rule(tmp_path):
    from cherry_megatron.data.blend import allocate

    import random

    rng = random.Random(0)
    rows = [{"text": " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(30)),
             "lang": lang} for lang, letters, n in (("big", "abcdefghij", 400), ("mid", "klmnopqrs", 60),
                                                     ("small", "tuvwxyz", 10)) for _ in range(n)]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = {}
    for r in rows:
        counts[r["lang"]] = counts.get(r["lang"], 0) + len(r["text"])
    budget = 0.3 * sum(counts.values())
    proc = run_cli(["-m", "cherry_megatron.cli.tokenizer", "--input", str(data), "--vocab-size", "400",
                    "--model-prefix", str(tmp_path / "tok"), "--balance", "unimax", "--budget-chars", str(budget),
                    "--max-epochs", "2"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    sampled = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"^  (\w+): [\d,]+ characters, ([\d,]+) sampled",
                                                                   proc.stderr, re.M)}
    want = allocate(counts, "unimax", budget, 2).tokens
    line = max(len(r["text"]) for r in rows)
    assert set(sampled) == set(counts)
    assert all(want[k] <= sampled[k] < want[k] + line for k in counts), (sampled, want)
    assert sampled["small"] == 2 * counts["small"]  # capped at 2 epochs
    bad = run_cli(["-m", "cherry_megatron.cli.tokenizer", "--input", str(data), "--vocab-size", "400",
                   "--model-prefix", str(tmp_path / "bad"), "--balance", "zipf"], timeout=300)
    assert bad.returncode != 0 and "unknown blend method" in error_lines(bad)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "tok.model", "tok.vocab"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine", "lang": "a"}\n{"lang": "b"}\n')
    for extra in ([], ["--balance", "unimax"]):
        bad = run_cli(["-m", "cherry_megatron.cli.tokenizer", "--input", str(broken), "--vocab-size", "400",
                       "--model-prefix", str(tmp_path / "new" / "bad"), *extra], timeout=300)
        assert bad.returncode != 0 and len(error_lines(bad)) == 1, bad.stderr
        assert not (tmp_path / "new").exists()
