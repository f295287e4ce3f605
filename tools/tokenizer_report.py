"""`python tools/tokenizer_report.py ARGS` = `cherry-tokenizer-report ARGS` (cherry_megatron/cli/tokenizer_report.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not
from cherry_megatron.cli.tokenizer_report import main  # noqa: E402

if __name__ == "__main__":
    main()
