#!/usr/bin/env python3
"""Build the embedded default corpus from the sources fetched by fetch_corpus.sh.

    python3 tools/build_corpus.py --sources data/sources --output data/corpus

Writes train.jsonl / heldout.jsonl ({"text", "source", "lang"} per line),
SOURCES.md and stats.json.  Standard library only, and deterministic: the same
sources give byte-identical output (no timestamps; everything sorted).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as a script: its own folder is on sys.path.
from corpus_sources import (BOILERPLATE_DOCS, MAX_BUDGET_DOC_BYTES, MIN_DOC_CHARS, MIN_HANGUL_SHARE,  # noqa: E402
                            MIN_KO_SENTENCE_CHARS, MIN_PARA_CHARS, SOURCES, _KO_SENTENCE_END, clean_para,
                            hangul_share, sha)

# ---------------------------------------------------------------------------------- pipeline
def keep_paragraphs(paras, lang):
    if lang == "code":
        return paras
    kept = []
    for para in map(clean_para, paras):
        if para in kept:  # running headers repeat on every PDF page
            continue
        if lang == "ko":
            short_ok = len(para) >= MIN_KO_SENTENCE_CHARS and _KO_SENTENCE_END.search(para)
            if hangul_share(para) < MIN_HANGUL_SHARE or (len(para) < MIN_PARA_CHARS and not short_ok):
                continue
        elif len(para) < MIN_PARA_CHARS:
            continue
        kept.append(para)
    return kept


def drop_repeated_paragraphs(docs, stats):
    """A paragraph found in many documents is template text: drop it everywhere.  One found in
    a few (shared help sections, quoted law articles) stays in its first document only, so the
    same text can't sit on both sides of the train/held-out split."""
    where = {}
    for i, doc in enumerate(docs):
        for para in doc["paras"] if doc["lang"] != "code" else ():
            where.setdefault(para, []).append(i)
    for i, doc in enumerate(docs):
        if doc["lang"] == "code":
            continue
        kept = []
        for para in doc["paras"]:
            if len(where[para]) >= BOILERPLATE_DOCS:
                stats[doc["source"]]["boilerplate_paragraphs"] += 1
            elif where[para][0] != i:
                stats[doc["source"]]["repeated_paragraphs"] += 1
            else:
                kept.append(para)
        doc["paras"] = kept


def heldout_score(text):
    """Position in [0, 1) from the text alone: adding a document never moves another one."""
    return int(sha(text)[:16], 16) / 16 ** 16


def build(sources_dir, heldout_fraction):
    docs, stats, meta = [], {}, {}
    for order, (name, lang, licence, extract, required, budget, note) in enumerate(SOURCES):
        src_dir = sources_dir / name
        if not src_dir.is_dir():
            if required:
                sys.exit(f"build_corpus: error: source directory {src_dir} is missing "
                         f"(run tools/fetch_corpus.sh {sources_dir} first)")
            print(f"  note: optional source {name} was not fetched; skipping it", file=sys.stderr)
            continue
        # fetch_corpus.sh leaves "<registry> <package> <version> <sha256>" in .fetched.
        marker = src_dir / ".fetched"
        registry, _, version, _ = (marker.read_text().split() if marker.exists()
                                   else ["deb", name, "unknown", ""])
        meta[name] = {"lang": lang, "licence": licence, "version": version, "note": note,
                      "origin": f"{'PyPI' if registry == 'pypi' else 'Debian'} package {name}",
                      "budget_bytes": budget}
        stats[name] = dict.fromkeys(("extracted_docs", "boilerplate_paragraphs", "repeated_paragraphs",
                                     "short_docs", "duplicate_docs", "over_budget_docs"), 0)
        t0 = time.time()
        for doc_id, paras, tier in extract(src_dir):
            stats[name]["extracted_docs"] += 1
            docs.append({"source": name, "lang": lang, "id": (order, doc_id),
                         "rank": (order, tier, sha(f"{name}\0{doc_id}")),
                         "paras": keep_paragraphs(paras, lang)})
        print(f"  {name}: {stats[name]['extracted_docs']} documents extracted in "
              f"{time.time() - t0:.1f}s", file=sys.stderr)

    docs.sort(key=lambda d: d["id"])
    drop_repeated_paragraphs(docs, stats)
    seen, used, selected = set(), {}, []
    # Budgeted sources take documents in a fixed pseudo-random order until the budget is spent.
    for doc in sorted(docs, key=lambda d: d["rank"]):
        text, st = "\n".join(doc["paras"]), stats[doc["source"]]
        key, size = sha(" ".join(text.split())), len(text.encode("utf-8"))
        budget = meta[doc["source"]]["budget_bytes"]
        if len(text) < MIN_DOC_CHARS:
            st["short_docs"] += 1
        elif key in seen:
            st["duplicate_docs"] += 1
        elif budget is not None and (size > MAX_BUDGET_DOC_BYTES
                                     or used.get(doc["source"], 0) + size > budget):
            st["over_budget_docs"] += 1
        else:
            seen.add(key)
            used[doc["source"]] = used.get(doc["source"], 0) + size
            selected.append({**doc, "text": text})

    splits = {"train": [], "heldout": []}
    for doc in sorted(selected, key=lambda d: d["id"]):
        split = "heldout" if heldout_score(doc["text"]) < heldout_fraction else "train"
        splits[split].append(doc)
        counts = stats[doc["source"]].setdefault(split, {"docs": 0, "chars": 0, "bytes": 0})
        counts["docs"] += 1
        counts["chars"] += len(doc["text"])
        counts["bytes"] += len(doc["text"].encode("utf-8"))
    return splits, stats, meta


# ----------------------------------------------------------------------------------- outputs
def write_atomic(path, text):
    """Temp file in OUT_DIR + os.replace: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def summary_table(stats, meta):
    """Markdown table, used both in SOURCES.md and as the printed summary."""
    empty = {"docs": 0, "chars": 0, "bytes": 0}
    rows = ["| Source | Origin | Version | Licence | Lang | Train docs | Train chars "
            "| Held-out docs | Held-out chars | MB (UTF-8) |", "|---|---|---|---|---|" + "---:|" * 5]
    total = [0] * 5
    for name, m in meta.items():
        tr, ho = stats[name].get("train", empty), stats[name].get("heldout", empty)
        nums = [tr["docs"], tr["chars"], ho["docs"], ho["chars"], tr["bytes"] + ho["bytes"]]
        total = [a + b for a, b in zip(total, nums)]
        rows.append(f"| {name} | {m['origin']} | {m['version']} | {m['licence']} | {m['lang']} | "
                    + " | ".join(map(str, nums[:4])) + f" | {nums[4] / 1e6:.2f} |")
    rows.append("| total | | | | | " + " | ".join(map(str, total[:4])) + f" | {total[4] / 1e6:.2f} |")
    return rows


def sources_md(stats, meta, heldout_fraction):
    lines = ["# Sources of the embedded default corpus", "",
             "Built by `tools/build_corpus.py` from packages fetched by `tools/fetch_corpus.sh`; "
             f"held-out = documents whose sha256(text) falls below {heldout_fraction}.", ""]
    lines += summary_table(stats, meta) + ["", "What each source contributes:", ""]
    lines += [f"- {name}: {m['note']}." for name, m in meta.items()]
    lines += ["", f"Korean text keeps only paragraphs whose letters are at least "
              f"{MIN_HANGUL_SHARE:.0%} Hangul. Paragraphs under {MIN_PARA_CHARS} characters "
              f"(Korean: unless a complete sentence of {MIN_KO_SENTENCE_CHARS}+), paragraphs "
              f"found in {BOILERPLATE_DOCS}+ documents, repeats of a paragraph after its first "
              f"document, documents under {MIN_DOC_CHARS} characters and exact duplicates are "
              "dropped.", "",
              "The corpus files are derived from these works and stay under their licences; the "
              "CC-BY-SA material needs attribution to the GNOME Documentation Project and "
              "share-alike redistribution.", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", required=True, type=Path, help="directory filled by fetch_corpus.sh")
    ap.add_argument("--output", required=True, type=Path, help="directory for the corpus files")
    ap.add_argument("--heldout-fraction", type=float, default=0.05)
    args = ap.parse_args(argv)
    if not args.sources.is_dir():
        sys.exit(f"build_corpus: error: sources directory {args.sources} does not exist "
                 f"(run tools/fetch_corpus.sh {args.sources} first)")
    if not 0.0 <= args.heldout_fraction < 1.0:
        sys.exit("build_corpus: error: --heldout-fraction must be in [0, 1)")

    t0 = time.time()
    splits, stats, meta = build(args.sources, args.heldout_fraction)
    args.output.mkdir(parents=True, exist_ok=True)
    digests = {}
    for split, docs in splits.items():
        body = "".join(json.dumps({"text": d["text"], "source": d["source"], "lang": d["lang"]},
                                  ensure_ascii=False) + "\n" for d in docs)
        write_atomic(args.output / f"{split}.jsonl", body)
        digests[f"{split}.jsonl"] = sha(body)
    write_atomic(args.output / "SOURCES.md", sources_md(stats, meta, args.heldout_fraction))
    params = {"heldout_fraction": args.heldout_fraction, "min_para_chars": MIN_PARA_CHARS,
              "min_ko_sentence_chars": MIN_KO_SENTENCE_CHARS, "min_doc_chars": MIN_DOC_CHARS,
              "min_hangul_share": MIN_HANGUL_SHARE, "boilerplate_docs": BOILERPLATE_DOCS}
    report = {"params": params, "sources": {n: {**meta[n], **stats[n]} for n in meta},
              "sha256": digests}
    write_atomic(args.output / "stats.json", json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print("\n".join(summary_table(stats, meta)))
    print(f"wrote {args.output}/{{train,heldout}}.jsonl, SOURCES.md, stats.json "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
