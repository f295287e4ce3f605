"""`python tools/build_blend.py ARGS` = `cherry-build-blend ARGS` (cherry_megatron/cli/build_blend.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not
from cherry_megatron.cli.build_blend import main  # noqa: E402

if __name__ == "__main__":
    main()
