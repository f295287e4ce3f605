#!/usr/bin/env python3
"""Build the shipped multilingual corpus (`make data`): 12 natural languages of very different sizes plus code.

    python tools/build_multilingual.py --sources data/sources --output data/multilingual

Sources, all fetched by tools/fetch_corpus.sh from Debian packages:
- gnome-user-docs (GNOME help and the system administration guide, CC-BY-SA-3.0) ships translations in ~40
  languages; how much of each is really translated differs (untranslated strings stay English). A language's
  text is its pages minus every paragraph that is also in the English original (`C`), minus paragraphs not
  mostly in the language's script (non-Latin languages), so its size is its translation's real extent.
- English: the same help in `C` plus 1.5 MB of the Python 3.11 documentation's prose (python3.11-doc,
  PSF-2.0; tutorials and reference first): the high-resource language.
- code: the Python standard library (libpython3.11-stdlib, PSF-2.0), byte-bounded.
Per language: held-out = documents in sha256 order until max(4,000 characters, 5% of the language);
train = the rest. Writes corpus/{train,heldout}.jsonl ({"text", "source", "lang"}), SOURCES.md, and, with
--tokenize, a sentencepiece tokenizer trained on a UniMax-balanced sample (tokenizer/multi8k.model) and one
.bin/.idx per language and split (tokens/{train,heldout}_<lang>_text_document; heldout_text_document: every
language's held-out, the natural mix). Deterministic.
"""
import argparse
import json
import re
import sys
import unicodedata
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from build_corpus import drop_repeated_paragraphs, heldout_score, write_atomic  # noqa: E402
from corpus_sources import (MIN_DOC_CHARS, MIN_PARA_CHARS, _local, extract_python_docs, extract_stdlib,  # noqa: E402
                            mallard_paragraphs, sha)

# lang code -> (gnome-user-docs directory, script ranges its letters must mostly fall in; None: Latin, checked
# against the English original only)
LANGUAGES = {
    "de": ("de", None), "fr": ("fr", None), "es": ("es", None), "vi": ("vi", None),
    "ru": ("ru", [(0x0400, 0x04FF)]), "el": ("el", [(0x0370, 0x03FF), (0x1F00, 0x1FFF)]),
    "ta": ("ta", [(0x0B80, 0x0BFF)]), "fa": ("fa", [(0x0600, 0x06FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)]),
    "ko": ("ko", [(0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x3130, 0x318F)]),
    "ja": ("ja", [(0x3040, 0x30FF), (0x4E00, 0x9FFF)]), "zh": ("zh_CN", [(0x4E00, 0x9FFF)]),
}
DENSE = {"ja", "zh", "ko"}  # a character carries a syllable or a word: shorter paragraphs are still sentences
MIN_SCRIPT_SHARE = 0.5
HELDOUT_MIN_CHARS, HELDOUT_FRACTION = 4000, 0.05
CODE_BUDGET_BYTES = 600_000
PYTHON_DOCS_BUDGET_BYTES = 1_500_000  # English: the largest language, as on the web, not 6 MB of it
HELP = "usr/share/help"
TOKENIZER_CHARS = 2_000_000  # UniMax sample of the train split for the tokenizer (of ~4.5M characters)
# corpus_sources.clean_para's junk minus the zero-width (non-)joiners, which Persian and Indic scripts spell with.
_JUNK = re.compile("[\x00-\x08\x0b-\x1f\x7f\u00ad\u200b\u2060\ufeff\ue000-\uf8ff]")


def clean_para(text):
    return " ".join(_JUNK.sub("", unicodedata.normalize("NFC", text)).split())


def script_share(text, ranges):
    letters = [ord(c) for c in text if c.isalpha()]
    inside = sum(1 for c in letters if any(lo <= c <= hi for lo, hi in ranges))
    return inside / len(letters) if letters else 0.0


def help_pages(root, lang_dir):
    """{page path: [paragraph, ...]} of one language of gnome-user-docs (GNOME help + system admin guide)."""
    out = {}
    for sub in ("gnome-help", "system-admin-guide"):
        trees = {}
        for path in sorted((root / HELP / lang_dir / sub).rglob("*.page")):
            try:
                trees[path] = ET.parse(path)
            except ET.ParseError as err:
                print(f"  warning: skipping {path}: {err}", file=sys.stderr)
        titles = {}
        for tree in trees.values():
            title = next((c for c in tree.getroot() if _local(c.tag) == "title"), None)
            if title is not None:
                titles[tree.getroot().get("id", "")] = " ".join("".join(title.itertext()).split())
        for path, tree in trees.items():
            out[str(path.relative_to(root / HELP / lang_dir))] = [clean_para(p) for p in mallard_paragraphs(tree, titles)]
    return out


def keep(paras, lang, english, ranges):
    kept = []
    for p in paras:
        if p in kept or len(p) < (8 if lang in DENSE else MIN_PARA_CHARS):
            continue
        if lang != "en" and p in english:  # an untranslated string
            continue
        if ranges and script_share(p, ranges) < MIN_SCRIPT_SHARE:
            continue
        kept.append(p)
    return kept


def collect(sources):
    gnome = sources / "gnome-user-docs"
    english_pages = help_pages(gnome, "C")
    english = {p for ps in english_pages.values() for p in ps}
    docs = []
    for path, paras in english_pages.items():
        docs.append({"source": "gnome-user-docs", "lang": "en", "id": ("en", "gnome", path), "paras": keep(paras, "en", english, None)})
    python = sorted(extract_python_docs(sources / "python3.11-doc"), key=lambda d: (d[2], sha(d[0])))
    used = 0
    for doc_id, paras, _ in python:  # prose sections first, then library pages, up to the budget
        paras = keep([clean_para(p) for p in paras], "en", english, None)
        size = sum(len(p.encode("utf-8")) + 1 for p in paras)
        if size <= 32_000 and used + size <= PYTHON_DOCS_BUDGET_BYTES:
            used += size
            docs.append({"source": "python3.11-doc", "lang": "en", "id": ("en", "python", doc_id), "paras": paras})
    for lang, (lang_dir, ranges) in LANGUAGES.items():
        for path, paras in help_pages(gnome, lang_dir).items():
            docs.append({"source": "gnome-user-docs", "lang": lang, "id": (lang, "gnome", path),
                         "paras": keep(paras, lang, english, ranges)})
    code = [(doc_id, paras[0]) for doc_id, paras, _ in extract_stdlib(sources / "libpython3.11-stdlib")]
    used = 0
    for doc_id, text in sorted(code, key=lambda c: sha(c[0])):  # a fixed pseudo-random order up to the budget
        size = len(text.encode("utf-8"))
        if size <= 32_000 and used + size <= CODE_BUDGET_BYTES:
            used += size
            docs.append({"source": "libpython3.11-stdlib", "lang": "code", "id": ("code", "stdlib", doc_id),
                         "paras": [text]})
    return docs


def build(sources):
    docs = collect(sources)
    stats = {}
    for d in docs:
        stats.setdefault(d["source"], dict.fromkeys(("boilerplate_paragraphs", "repeated_paragraphs"), 0))
    # Boilerplate and repeats are judged within a language: the same paragraph in two languages is no repeat.
    for lang in sorted({d["lang"] for d in docs}):
        drop_repeated_paragraphs(sorted((d for d in docs if d["lang"] == lang), key=lambda d: d["id"]), stats)
    seen, by_lang = set(), {}
    for d in sorted(docs, key=lambda d: d["id"]):
        text = "\n".join(d["paras"])
        key = sha(" ".join(text.split()))
        if len(text) >= (MIN_DOC_CHARS // 2 if d["lang"] in DENSE else MIN_DOC_CHARS) and key not in seen:
            seen.add(key)
            by_lang.setdefault(d["lang"], []).append({"text": text, "source": d["source"], "lang": d["lang"]})
    splits = {"train": [], "heldout": []}
    for lang, items in by_lang.items():
        need = max(HELDOUT_MIN_CHARS, HELDOUT_FRACTION * sum(len(d["text"]) for d in items))
        held = 0
        for d in sorted(items, key=lambda d: heldout_score(d["text"])):
            split = "heldout" if held < need else "train"
            held += len(d["text"]) if split == "heldout" else 0
            splits[split].append(d)
    for split in splits:
        splits[split].sort(key=lambda d: (d["lang"], sha(d["text"])))
    return splits


def versions(sources):
    out = {}
    for name in ("gnome-user-docs", "python3.11-doc", "libpython3.11-stdlib"):
        marker = sources / name / ".fetched"
        out[name] = marker.read_text().split()[2] if marker.exists() else "unknown"
    return out


def sources_md(splits, sources):
    v = versions(sources)
    licence = {"gnome-user-docs": "CC-BY-SA-3.0", "python3.11-doc": "PSF-2.0", "libpython3.11-stdlib": "PSF-2.0"}
    rows = {}
    for split, items in splits.items():
        for d in items:
            r = rows.setdefault((d["lang"], d["source"]), {"train": [0, 0, 0], "heldout": [0, 0, 0]})[split]
            r[0] += 1
            r[1] += len(d["text"])
            r[2] += len(d["text"].encode("utf-8"))
    total = sum(r[s][1] for r in rows.values() for s in r)
    lines = ["", "# Sources of the multilingual corpus (data/multilingual)", "",
             "Built by `tools/build_multilingual.py` (`make data`) from the Debian packages fetched by "
             "`tools/fetch_corpus.sh`. A language's GNOME help is its translated paragraphs only (every paragraph "
             f"also in the English original is dropped; non-Latin languages keep paragraphs at least "
             f"{MIN_SCRIPT_SHARE:.0%} in their script), so its size is how far its translation got. Held-out per "
             f"language: documents in sha256 order until max({HELDOUT_MIN_CHARS:,} characters, "
             f"{HELDOUT_FRACTION:.0%}).", "",
             "| Lang | Source | Version | Licence | Train docs | Train chars | Held-out docs | Held-out chars | "
             "Share of chars | MB (UTF-8) |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (lang, source), r in sorted(rows.items(), key=lambda kv: -(kv[1]["train"][1] + kv[1]["heldout"][1])):
        tr, ho = r["train"], r["heldout"]
        lines.append(f"| {lang} | {source} | {v[source]} | {licence[source]} | {tr[0]} | {tr[1]} | {ho[0]} | {ho[1]} | "
                     f"{(tr[1] + ho[1]) / total:.2%} | {(tr[2] + ho[2]) / 1e6:.2f} |")
    lines += ["", "The GNOME material needs attribution to the GNOME Documentation Project and share-alike "
              "redistribution (CC-BY-SA-3.0); the Python material is under the PSF licence.", ""]
    return "\n".join(lines)


def tokenize(out: Path, langs: list[str]):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cherry_megatron.cli import preprocess, tokenizer

    model = out / "tokenizer" / "multi8k"
    tokenizer.main(["--input", str(out / "corpus" / "train.jsonl"), "--vocab-size", "8192", "--model-prefix",
                    str(model), "--balance", "unimax", "--max-epochs", "1", "--budget-chars", str(TOKENIZER_CHARS)])
    preprocess.main(["--input", str(out / "corpus" / "heldout.jsonl"), "--tokenizer-model", f"{model}.model",
                     "--output-prefix", str(out / "tokens" / "heldout_text_document"), "--workers", "2"])
    for split in ("train", "heldout"):
        for lang in langs:
            preprocess.main(["--input", str(out / "corpus" / f"{split}.jsonl"), "--tokenizer-model",
                             f"{model}.model", "--output-prefix", str(out / "tokens" / f"{split}_{lang}_text_document"),
                             "--where", f"lang={lang}", "--workers", "2"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", required=True, type=Path)
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--tokenize", action="store_true", help="also train the tokenizer and write the .bin/.idx files")
    args = ap.parse_args(argv)
    for name in ("gnome-user-docs", "python3.11-doc", "libpython3.11-stdlib"):
        if not (args.sources / name).is_dir():
            sys.exit(f"error: build_multilingual: source directory {args.sources / name} is missing "
                     f"(run tools/fetch_corpus.sh {args.sources} first)")
    t0 = time.time()
    splits = build(args.sources)
    (args.output / "corpus").mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        write_atomic(args.output / "corpus" / f"{split}.jsonl",
                     "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in items))
    md = sources_md(splits, args.sources)
    write_atomic(args.output / "SOURCES.md", md)
    print(md)
    print(f"wrote {args.output}/corpus/{{train,heldout}}.jsonl, SOURCES.md in {time.time() - t0:.1f}s", file=sys.stderr)
    if args.tokenize:
        tokenize(args.output, sorted({d["lang"] for d in splits["train"]}))


if __name__ == "__main__":
    main()
