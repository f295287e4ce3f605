#!/usr/bin/env python3
"""Build the embedded default corpus from the sources fetched by fetch_corpus.sh.

    python3 tools/build_corpus.py --sources data/sources --output data/corpus

Writes train.jsonl / heldout.jsonl ({"text", "source", "lang"} per line),
SOURCES.md and stats.json.  Standard library only, and deterministic: the same
sources give byte-identical output (no timestamps; everything sorted).
"""
import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import unicodedata
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

MIN_PARA_CHARS = 20        # shorter paragraphs are mostly headings and UI labels...
MIN_KO_SENTENCE_CHARS = 8  # ...but Korean is dense: keep short complete sentences
MIN_DOC_CHARS = 200
MIN_HANGUL_SHARE = 0.5     # Korean help is partly untranslated English
BOILERPLATE_DOCS = 5       # a paragraph in this many documents is template text
MAX_BUDGET_DOC_BYTES = 32_000  # many mid-sized pages beat a few huge ones (smoother split)

_JUNK = re.compile("[\x00-\x08\x0b-\x1f\x7f\u00ad\u200b-\u200d\u2060\ufeff\ue000-\uf8ff]")
_KO_SENTENCE_END = re.compile(r"[가-힣][다요][.!?]?$|[가-힣][.!?]$")


def clean_para(text):
    """NFC, drop control/zero-width/private-use glyphs, collapse whitespace."""
    return " ".join(_JUNK.sub("", unicodedata.normalize("NFC", text)).split())


def hangul_share(text):
    letters = [c for c in text if c.isalpha()]
    hangul = sum(1 for c in letters if "\uac00" <= c <= "\ud7a3"
                 or "\u1100" <= c <= "\u11ff" or "\u3130" <= c <= "\u318f")
    return hangul / len(letters) if letters else 0.0


def sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Extractors: each yields (doc_id, [paragraph, ...], tier) for one source directory.  Tier only
# matters for byte-budgeted sources, which take lower tiers first.

# A PDF line starting like this begins a new paragraph (list items, law articles, Q&A).
_PDF_MARKER = re.compile(r"^(?:[-•·∙◦▪■□○●◎◇◆※*→⇒▶►☞<\[［「]|\d{1,2}[.)]\s|\(\d{1,2}\)"
                         r"|[①-⑳㉠-㉭]|[가-하][.)]\s|제\s?\d+\s?[조장절항]|Q\d*[.:\s]|A[.:\s]|사례\s*\d)")
_PDF_END = re.compile(r"(?:[.?!:]|[가-힣](?:다|함|음|임|됨))$")


def pdf_page_paragraphs(page_text):
    """Re-join the hard-wrapped lines of PDF-extracted text into paragraphs."""
    paras, cur = [], []
    for line in filter(None, (line.strip() for line in page_text.split("\n"))):
        # Lines under ~30 chars are headings or running headers, never wrapped prose.
        if cur and (_PDF_MARKER.match(line) or _PDF_END.search(cur[-1]) or len(cur[-1]) < 30):
            paras.append(" ".join(cur))
            cur = []
        cur.append(line)
    return paras + [" ".join(cur)] if cur else paras


def extract_rnd_manuals(root):
    # manual_*.json hold PDF manuals split by section; the other JSON/YAML files are metadata.
    for path in sorted((root / "korean_rnd_regs_mcp").glob("manual_*.json")):
        for sec in json.loads(path.read_text(encoding="utf-8"))["sections"]:
            paras = [p for page in sec.get("pages", []) for p in pdf_page_paragraphs(page["text"])]
            yield f"{path.name}#{sec['id']}", paras, 0


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
         "source", "track", "wbr"}
_BLOCK = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt", "dd",
          "table", "tr", "td", "th", "caption", "blockquote", "section", "figcaption", "br", "hr",
          "pre"}


class _HTMLText(HTMLParser):
    """Block-separated text inside the first element whose attrs satisfy `root`, minus elements
    for which `skip(tag, attrs)` holds.  Open elements are tracked as (tag, nesting depth)."""

    def __init__(self, root, skip):
        super().__init__(convert_charrefs=True)
        self.root, self.skip = root, skip
        self.depth, self.inside, self.skipping = {}, None, None
        self.paras, self.buf = [], []

    def flush(self):
        text = "".join(self.buf).strip()
        if text:
            self.paras.append(text)
        self.buf = []

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCK:
            self.flush()
        if tag in _VOID:
            return
        attrs = dict(attrs)
        d = self.depth[tag] = self.depth.get(tag, 0) + 1
        if self.inside is None and self.root(attrs):
            self.inside = (tag, d)
        elif self.inside and self.skipping is None and self.skip(tag, attrs):
            self.skipping = (tag, d)

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        d = self.depth.get(tag, 0)
        if self.skipping == (tag, d):
            self.skipping = None
        elif self.inside == (tag, d):
            self.inside = None
        self.depth[tag] = max(d - 1, 0)
        if tag in _BLOCK:
            self.flush()

    def handle_data(self, data):
        if self.inside and self.skipping is None:
            self.buf.append(data)


def html_paragraphs(path, root, skip):
    parser = _HTMLText(root, skip)
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    parser.flush()
    return parser.paras


def extract_libreoffice(root):
    base = root / "usr/share/libreoffice/help/ko"
    # Platform variants (MAC/UNIX/...) are all hidden until JS picks one: keep the default.
    skip = lambda tag, a: (tag in ("script", "style", "button")
                           or ("hidden" in a and not (a.get("id") or "").startswith("default")))
    for path in sorted(base.rglob("*.html")):
        yield str(path.relative_to(base)), html_paragraphs(
            path, lambda a: a.get("id") == "DisplayArea", skip), 0


def extract_python_docs(root):
    base = root / "usr/share/doc/python3.11/html"
    # Code examples go (the code share comes from the stdlib); tables of contents only repeat
    # the headings, and would win the "first copy" of each in drop_repeated_paragraphs.
    skip = lambda tag, a: tag in ("script", "style", "pre") or any(
        c in ("headerlink", "toctree-wrapper", "contents", "contentstable") or c.startswith("highlight")
        for c in (a.get("class") or "").split())
    for path in sorted(base.rglob("*.html")):
        rel = path.relative_to(base)
        top = rel.parts[0]
        # Indexes and TOCs are link lists; the C API and distutils pages are not prose.
        if top.startswith(("_", "genindex")) or rel.name == "changelog.html" or top in (
                "c-api", "distutils", "includes", "contents.html", "py-modindex.html",
                "search.html"):
            continue
        tier = 0 if top in ("tutorial", "howto", "faq", "reference", "using", "extending") else 1
        yield str(rel), html_paragraphs(path, lambda a: a.get("role") == "main", skip), tier


_MAL_BLOCK = {"p", "title", "subtitle", "desc", "item", "td", "th", "tr", "note", "section",
              "list", "steps", "terms", "tree", "example", "quote", "caption", "listing",
              "figure", "synopsis", "links"}
_MAL_SKIP = {"credit", "revision", "media", "screen", "comment", "include", "license", "thumb",
             "keywords"}
_MAL_SEQ = {"guiseq": " \u25b8 ", "keyseq": "+"}  # as the help viewer renders them


def _local(tag):
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""  # comments have no str tag


def mallard_paragraphs(tree, titles):
    paras, buf = [], []

    def flush():
        text = "".join(buf).strip()
        if text:
            paras.append(text)
        buf.clear()

    def walk(el, in_info):
        tag = _local(el.tag)
        block_code = tag == "code" and "\n" in "".join(el.itertext())
        # <info> is credits and link metadata, but its <desc> is a real sentence.
        if tag in _MAL_SKIP or block_code or (in_info and tag in ("title", "link")):
            pass
        elif tag in _MAL_SEQ:
            buf.append(_MAL_SEQ[tag].join("".join(c.itertext()).strip() for c in el))
        elif tag == "link" and not len(el) and not (el.text or "").strip():
            # An empty link shows its target page's title (or its URL).
            buf.append(titles.get(el.get("xref", "").split("#")[0], el.get("href", "")))
        else:
            if tag in _MAL_BLOCK:
                flush()
            buf.append(el.text or "")
            for child in el:
                walk(child, in_info or tag == "info")
            if tag in _MAL_BLOCK:
                flush()
        buf.append(el.tail or "")

    walk(tree.getroot(), False)
    flush()
    return paras


def mallard_extractor(subdirs):
    def extract(root):
        base = root / "usr/share/help/ko"
        for sub in subdirs:
            trees = {}
            for path in sorted((base / sub).rglob("*.page")):
                try:
                    trees[path] = ET.parse(path)
                except ET.ParseError as err:
                    print(f"  warning: skipping {path}: {err}", file=sys.stderr)
            titles = {}  # page id -> title, to render <link xref="id"/>
            for tree in trees.values():
                title = next((c for c in tree.getroot() if _local(c.tag) == "title"), None)
                if title is not None:
                    titles[tree.getroot().get("id", "")] = " ".join("".join(title.itertext()).split())
            for path, tree in trees.items():
                yield str(path.relative_to(base)), mallard_paragraphs(tree, titles), 0
    return extract


def extract_stdlib(root):
    base = root / "usr/lib/python3.11"
    # Tests, codec tables and the pydoc topic dump are not representative code.
    skip_dirs = {"test", "tests", "idle_test", "encodings", "pydoc_data", "site-packages"}
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if path.is_symlink() or skip_dirs & set(rel.parts) or rel.name.startswith("_sysconfigdata"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        # Code keeps its layout: it is one "paragraph", only trailing whitespace goes.
        yield str(rel), ["\n".join(line.rstrip() for line in text.split("\n")).strip("\n")], 0


# name, lang, licence, extractor, required, byte budget (None = take all), what it contributes
SOURCES = [
    ("korean-rnd-regs-mcp", "ko", "Apache-2.0", extract_rnd_manuals, True, None,
     "Korean manuals on national R&D regulations (`manual_*.json`, PDF text), one document "
     "per manual section, hard line wraps re-joined"),
    ("libreoffice-help-ko", "ko", "MPL-2.0", extract_libreoffice, True, None,
     "Korean LibreOffice help, one document per page"),
    ("gnome-user-docs", "ko", "CC-BY-SA-3.0", mallard_extractor(["gnome-help", "system-admin-guide"]),
     True, None, "Korean GNOME help and system administration guide (Mallard pages)"),
    ("gnome-devel-docs", "ko", "CC-BY-SA-3.0",
     mallard_extractor(["gnome-devel-demos", "platform-overview", "programming-guidelines"]),
     False, None, "Korean pages of the CC-BY-SA guides only; the GFDL guides are left out"),
    ("python3.11-doc", "en", "PSF-2.0", extract_python_docs, True, 1_800_000,
     "English Python docs, byte-bounded: prose sections first, then library pages in a fixed "
     "hash order; code examples removed"),
    ("libpython3.11-stdlib", "code", "PSF-2.0", extract_stdlib, True, 800_000,
     "Python standard library source, byte-bounded, in a fixed hash order (no tests, codec "
     "tables or pydoc data)"),
]


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
