"""Checkpoint conversion between our training layouts and formats (tools/convert_checkpoint.py).

A conversion reads a source into a `Checkpoint`: the run's config and a lazy full (TP=1) tensor per
name, materialised one at a time; a writer streams those tensors into the target format and layout.
"""
