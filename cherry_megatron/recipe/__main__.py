"""python -m cherry_megatron.recipe run --recipe RECIPE.yaml --run-dir DIR [--set [STAGE:]KEY=VALUE ...]
        [--until STAGE] [--rerun STAGE]
python -m cherry_megatron.recipe status --recipe RECIPE.yaml --run-dir DIR

Both end with one JSON line, {"stages": {name: {kind, status, params, active_params, tokens, wall_s,
eval_loss}}}, also written to DIR/report.json beside DIR/report.md and DIR/report.png. The recipe is copied
to DIR/recipe.yaml at the first run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path

from cherry_megatron.errors import cli_errors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "status"):
        s = sub.add_parser(name)
        s.add_argument("--recipe", required=True)
        s.add_argument("--run-dir", type=Path, required=True)
        s.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="[STAGE:]KEY=VALUE")
        if name == "run":
            s.add_argument("--until", default="")
            s.add_argument("--rerun", default="")
    args = p.parse_args(argv)
    with cli_errors():
        from cherry_megatron.recipe import runner
        from cherry_megatron.recipe.spec import load_recipe

        stages = load_recipe(args.recipe, [x for group in args.overrides for x in group])
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the one JSON line
            if args.command == "run":
                runner.plan(stages, args.run_dir, args.until, args.rerun)  # every refusal before anything runs
                args.run_dir.mkdir(parents=True, exist_ok=True)
                if not (args.run_dir / "recipe.yaml").exists():
                    shutil.copyfile(args.recipe, args.run_dir / "recipe.yaml")
                result = runner.run(stages, args.run_dir, args.until, args.rerun)
            else:
                result = runner.status(stages, args.run_dir)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
