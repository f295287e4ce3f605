"""`python -m cherry_megatron.generate`: cli/generate.py."""
from cherry_megatron.cli.generate import main

main()
