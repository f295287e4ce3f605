"""The corpus sources of tools/build_corpus.py: text cleaning rules and one extractor per fetched package.

Each extractor yields (document id, paragraphs, skipped count) for one source directory; `SOURCES` says
which extractor reads which package, under which licence and byte budget. Standard library only.
"""
import hashlib
import json
import re
import sys
import unicodedata
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

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
