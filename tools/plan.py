"""`python tools/plan.py ARGS` = `cherry-plan ARGS` (cherry_megatron/cli/plan.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not
from cherry_megatron.cli.plan import main  # noqa: E402

if __name__ == "__main__":
    main()
