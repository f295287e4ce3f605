"""Language blends: how many tokens of each language a run draws, by a stated rule.

FuxiTranyu (arXiv 2408.06273) set its language shares by hand; these are the reproducible rules:
  natural      p_l = n_l / sum n                      (the data as it is; high-resource languages dominate)
  temperature  p_l = n_l^(1/T) / sum n^(1/T)           (mT5's T = 3.33; T = 1 is natural, T -> inf uniform)
  unimax       UniMax (Chung et al. 2023, Algorithm 1): languages in increasing size, each given an equal
               share of the budget still unallocated, capped at N epochs of its own data; the rest flows to
               the larger languages. p_l = allocation_l / budget.
`n_l` are token counts (the .idx's sequence lengths, EOD included). A blend file (YAML, written by
tools/build_blend.py) holds each language's prefix and weight; `data.blend_file` expands it into megatron-core's
weighted `data.paths` (its BlendedDataset draws samples to those weights deterministically).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from cherry_megatron.errors import ConfigError, DataError

METHODS = ("unimax", "temperature", "natural")


@dataclass
class Blend:
    weights: dict  # {lang: share of the sampled tokens}, summing to 1
    tokens: dict  # {lang: tokens allocated from the budget}
    epochs: dict  # {lang: allocated / its own tokens}


def lang_pairs(items: list[str], what: str, flag: str) -> dict:
    """{lang: value} of command-line LANG=VALUE items (each language once)."""
    out = {}
    for item in items:
        lang, sep, value = item.partition("=")
        if not sep or not lang or not value:
            raise ConfigError(f"{flag} '{item}' is not LANG={what}")
        if lang in out:
            raise ConfigError(f"{flag}: language '{lang}' is given twice")
        out[lang] = value
    return out


def unimax(counts: dict, budget: float, max_epochs: float) -> dict:
    """{lang: allocated tokens}: UniMax's allocation of `budget` tokens over `counts`, at most `max_epochs` each."""
    if budget > max_epochs * sum(counts.values()) * (1 + 1e-12):
        raise ConfigError(f"a budget of {budget:,.0f} tokens cannot be filled at {max_epochs:g} epochs of "
                          f"{sum(counts.values()):,} tokens (at most {max_epochs * sum(counts.values()):,.0f}): "
                          "raise --max-epochs or lower --budget")
    out, left = {}, float(budget)
    order = sorted(counts, key=lambda lang: (counts[lang], lang))
    for i, lang in enumerate(order):
        out[lang] = min(left / (len(order) - i), max_epochs * counts[lang])
        left -= out[lang]
    return {lang: out[lang] for lang in counts}


def temperature_weights(counts: dict, temperature: float) -> dict:
    # In log space: n^(1/T) of billions of tokens at T near 0 would overflow.
    logs = np.array([np.log(counts[lang]) / temperature for lang in counts])
    w = np.exp(logs - logs.max())
    return dict(zip(counts, (w / w.sum()).tolist()))


def allocate(counts: dict, method: str, budget: float = 0, max_epochs: float = 1.0,
             temperature: float = 3.33) -> Blend:
    """The blend of `method` over `counts` ({lang: tokens}); budget 0: one pass over all the data."""
    if method not in METHODS:
        raise ConfigError(f"unknown blend method '{method}': one of {', '.join(METHODS)}")
    if not counts:
        raise ConfigError("a blend needs at least one language")
    for lang, n in counts.items():
        if not math.isfinite(n) or n <= 0:
            raise DataError(f"language '{lang}' has {n} tokens: a blend needs a positive, finite count")
    if not all(map(math.isfinite, (budget, max_epochs, temperature))) or budget < 0 or max_epochs <= 0 \
            or temperature <= 0:
        raise ConfigError("--budget must be finite and >= 0, --max-epochs and --temperature finite and > 0")
    budget = float(budget or sum(counts.values()))
    if method == "unimax":
        tokens = unimax(counts, budget, max_epochs)
        weights = {lang: t / budget for lang, t in tokens.items()}
    else:
        weights = temperature_weights(counts, 1.0 if method == "natural" else temperature)
        tokens = {lang: w * budget for lang, w in weights.items()}
    return Blend(weights, tokens, {lang: tokens[lang] / counts[lang] for lang in counts})


def token_count(prefix: str) -> int:
    from cherry_megatron.data.indexed import token_stream

    return len(token_stream(prefix))


def write_blend(path: Path, blend: Blend, prefixes: dict, settings: dict) -> None:
    from cherry_megatron.checkpoint.run_dir import atomic_write_text

    doc = {**settings, "languages": {lang: {"prefix": str(prefixes[lang]), "weight": blend.weights[lang],
                                            "tokens": round(blend.tokens[lang]), "epochs": blend.epochs[lang]}
                                     for lang in blend.weights}}
    atomic_write_text(Path(path), yaml.safe_dump(doc, sort_keys=False))


def read_blend(path: str) -> dict:
    """{lang: (weight, prefix)} of a blend file, checked."""
    return _read_blend_file(path)[1]


def _read_blend_file(path: str) -> tuple[dict, dict]:
    """(the blend file's document, its checked {lang: (weight, prefix)})."""
    from cherry_megatron.config import read_yaml

    doc = read_yaml(path, "data.blend_file")
    langs = doc.get("languages") if isinstance(doc, dict) else None
    if not isinstance(langs, dict) or not langs:
        raise ConfigError(f"data.blend_file {path} has no 'languages' mapping (write it with tools/build_blend.py)")
    out = {}
    for lang, entry in langs.items():
        if not isinstance(entry, dict) or "prefix" not in entry or "weight" not in entry:
            raise ConfigError(f"data.blend_file {path}: language '{lang}' needs a prefix and a weight")
        try:
            weight = float(entry["weight"])
        except (TypeError, ValueError):
            weight = math.nan
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"data.blend_file {path}: language '{lang}' has weight {entry['weight']!r}, not a "
                              "finite number >= 0")
        out[str(lang)] = (weight, str(entry["prefix"]))
    return doc, out


def check_caps(data, run_tokens: int, seq_length: int) -> None:
    """A run longer than its UniMax blend's budget would take the capped languages past their epoch cap:
    refused (rebuild the blend with --budget = the run's tokens)."""
    if not data.blend_file:
        return
    doc, langs = _read_blend_file(data.blend_file)
    cap = doc.get("max_epochs") if doc.get("method") == "unimax" else None
    if not cap:
        return
    for lang, (w, prefix) in langs.items():
        n = token_count(prefix)
        # megatron's blending is deterministic: a language's samples stay within one of weight x samples.
        epochs = (w * run_tokens + seq_length) / n
        if w > 0 and epochs > cap * (1 + 1e-6) + 2 * seq_length / n:
            raise ConfigError(f"this run trains on {run_tokens:,} tokens, which takes '{lang}' to {epochs:.2f} "
                              f"epochs, past its blend's cap of {cap:g} (the blend was made for "
                              f"{doc.get('budget')} tokens): rebuild it with tools/build_blend.py --budget "
                              f"{run_tokens}")


def expand(blend_file: str) -> list:
    """`data.paths` of a blend file: [w1, prefix1, w2, prefix2, ...] (languages of weight 0 left out; one
    language: its prefix alone)."""
    used = [(w, prefix) for w, prefix in read_blend(blend_file).values() if w > 0]
    if not used:
        raise ConfigError(f"data.blend_file {blend_file}: every weight is 0")
    return [used[0][1]] if len(used) == 1 else [x for w, prefix in used for x in (str(w), prefix)]


def resolve(data) -> None:
    """Set `data.paths` from `data.blend_file` (a run's saved config holds both: they must agree)."""
    if not data.blend_file:
        return
    paths = expand(data.blend_file)
    if data.paths and [str(p) for p in data.paths] != paths:
        raise ConfigError(f"data.paths and data.blend_file {data.blend_file} disagree: give one of them (the blend "
                          "file sets data.paths)")
    data.paths = paths


def language_names(data) -> list[str]:
    """One name per dataset of `data.paths`, in megatron's order: the blend file's languages, or each prefix's
    file name (`train_ko_text_document` -> `train_ko`)."""
    from megatron.core.datasets.utils import get_blend_from_list

    if data.blend_file:
        return [lang for lang, (w, _) in read_blend(data.blend_file).items() if w > 0]
    prefixes = get_blend_from_list([str(p) for p in data.paths])[0]
    names = [re.sub(r"_text_document$", "", Path(p).name) for p in prefixes]
    # The same file name twice (another directory, or the same prefix again) must not merge two counts.
    return [n if names.count(n) == 1 else f"{n}.{names[:i].count(n)}" for i, n in enumerate(names)]


class Shares:
    """Realised per-language tokens and epochs of a run after `samples` global samples: the sampler reads sample
    i at step i // global_batch (gpt_data.TrainData), so the count is exact on every rank without communication."""

    def __init__(self, names: list[str], dataset_index: np.ndarray | None, epoch_tokens: list[int], seq_length: int):
        self.names, self.index, self.epoch_tokens, self.seq = names, dataset_index, epoch_tokens, seq_length
        self.counted, self.counts = 0, np.zeros(len(names), dtype=np.int64)

    def at(self, samples: int) -> dict:
        if self.index is None:
            self.counts[0] = samples
        else:  # counted on from the last call: a long run's index is read once, not at every log step
            if samples < self.counted:
                self.counted, self.counts[:] = 0, 0
            self.counts += np.bincount(self.index[self.counted:samples], minlength=len(self.names))
            self.counted = samples
        tokens = {n: int(c) * self.seq for n, c in zip(self.names, self.counts)}
        return {"lang_tokens": tokens,
                "lang_epochs": {n: tokens[n] / t for n, t in zip(self.names, self.epoch_tokens)}}
