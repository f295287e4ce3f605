"""The CHERRY recipe as one resumable command: a YAML list of named stages run in order into one directory.

    spec.py      the recipe file: stages, their kinds, inputs named by earlier stages, --set overrides, checks
    stages.py    what each kind runs (the project's own tools, as a user would) and what it reports
    runner.py    run in order, skip finished stages (marker written last), refuse changed ones, the report
    __main__.py  `python -m cherry_megatron.recipe run | status`
"""
