"""`python tools/prune_experts.py ARGS`: cherry_megatron/cli/prune_experts.py (no console script)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not
from cherry_megatron.cli.prune_experts import main  # noqa: E402

if __name__ == "__main__":
    main()
