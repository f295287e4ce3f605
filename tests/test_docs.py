"""The README's layout section names every module and package of the tree, and nothing that is not there."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    return section[section.index("```") + 3:section.index("```", section.index("```") + 3)]


def test_the_readme_layout_matches_the_package_tree():
    block = layout_block()
    pkg = ROOT / "cherry_megatron"
    named = set(re.findall(r"[\w\-]+(?:\.py|/)", block))
    for path in sorted(pkg.iterdir()):
        if path.name.startswith(("_", ".")) or path.name == "__pycache__":
            continue
        entry = path.name + ("/" if path.is_dir() else "")
        assert entry in named, f"README layout does not mention cherry_megatron/{entry}"
    for sub in [p for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name != "configs"]:
        for module in sorted(sub.glob("*.py")):
            if module.name != "__init__.py":
                assert module.name in named, f"README layout does not mention {sub.name}/{module.name}"
    tracked = {p.name for d in ("cherry_megatron", "tools", "bench", "tests") for p in (ROOT / d).rglob("*.py")}
    for name in re.findall(r"\b(\w+\.py)\b", block):  # nothing named that is gone
        assert name in tracked, name


def test_no_doc_or_comment_points_outside_the_repo():
    for path in [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "cherry_megatron").rglob("*.py"),
                 *(ROOT / "tools").rglob("*.py"), *(ROOT / "bench").glob("*.py")]:
        text = path.read_text()
        assert "../shared" not in text and "/work/" not in text, path
        for m in re.finditer(r"(?<![\w/])(?:docs/)?DESIGN\.md", text):
            assert m.group(0) == "docs/DESIGN.md", f"{path}: {m.group(0)} (the design document is docs/DESIGN.md)"
