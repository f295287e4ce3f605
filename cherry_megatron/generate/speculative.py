"""Self-speculative greedy decoding (LayerSkip, arXiv 2404.16710): the model's first D layer units and its
own head draft K tokens, the remaining units verify them in one pass, and the output is exactly the
full-depth greedy output.

One round, with n positions cached everywhere and `pending` the next token (known, not yet cached):
  draft   feed pending, d1, ..., d(K-1) one at a time through units [0, D) (their caches grow to n + K),
          reading out d1..dK at depth D; keep the depth-D stream of each fed token;
  verify  units [D, L) over those K saved streams at positions n..n+K-1 in one pass: v1..vK, the full
          model's greedy choice after pending, d1, ..., d(K-1);
  accept  the longest prefix with d_i == v_i (a tokens); emit d1..da and, when a < K, v(a+1) (the
          verifier's token is free); every cache is cropped to the positions whose tokens were right.
The early units' work on an accepted draft is reused as is: the verifier continues from the same stream
the full model would have computed (the early units are the same function), which is why the output is
exact. For a recurrent model the units are loop positions, so any exit position works the same way.
Exact means the same computation: the verifier runs K positions in one pass where plain decoding runs one,
so in bf16 a near-tie can round the other way (fp32 on CPU: identical in every test).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cherry_megatron.generate.cache import ModelCache, full_logits, run_units
from cherry_megatron.generate.decode import prefill


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens after the one the prefill chose
    unit_tokens: int = 0  # layer-unit applications to one token, drafts and verification together

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.drafted)

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / max(1, self.rounds)


@torch.no_grad()
def speculative_generate(model, prompt: list[int], max_new_tokens: int, vocab: int, exit_depth: int,
                         draft_tokens: int, eos: int | None = None, chunk: int = 0,
                         stats: SpeculativeStats | None = None) -> list[int]:
    """The same tokens as `decode.generate` with a greedy sampler, drafted at `exit_depth` units."""
    depth, d, k = len(model.units()), exit_depth, draft_tokens
    if not prompt:
        raise ValueError("the prompt is empty")
    if not 1 <= d < depth:
        raise ValueError(f"the exit depth must lie in 1..{depth - 1} (the model has {depth} layer units), got {d}")
    if k < 1:
        raise ValueError(f"the draft length must be >= 1, got {k}")
    stats = stats if stats is not None else SpeculativeStats()
    device = model.embed.weight.device
    cache = ModelCache(model, 1, len(prompt) + max_new_tokens + k)
    pending = prefill(model, torch.tensor([prompt], device=device), cache, vocab, chunk, last_only=True)[:, -1].argmax(-1)
    out, n = [int(pending)], len(prompt)
    while len(out) < max_new_tokens and out[-1] != eos:
        streams, drafts, token = [], [], pending
        for j in range(k):
            x = run_units(model, model.embed(token.view(1, 1)), cache, n + j, 0, d)
            streams.append(x)
            token = full_logits(model, x, vocab)[:, -1].argmax(-1)
            drafts.append(token)
        verified = full_logits(model, run_units(model, torch.cat(streams, dim=1), cache, n, d, depth), vocab)[0]
        verified = verified.argmax(-1)
        drafted = torch.cat(drafts)
        agree = (drafted == verified).tolist()
        a = agree.index(False) if False in agree else k
        new = drafted[:a].tolist() + ([int(verified[a])] if a < k else [])
        pending = verified[a:a + 1] if a < k else drafted[k - 1:]
        n += a + 1 if a < k else k
        cache.crop(n)
        lengths = cache.lengths()
        assert lengths == [n] * len(lengths), lengths  # every unit holds exactly the right tokens' positions
        stats.rounds, stats.drafted, stats.accepted = stats.rounds + 1, stats.drafted + k, stats.accepted + a
        stats.emitted += min(len(new), max_new_tokens - len(out))  # the last round may overshoot
        stats.unit_tokens += k * depth  # k tokens through D units drafting and L - D verifying
        out += new
    out = out[:max_new_tokens]
    return out[:out.index(eos) + 1] if eos in out else out
