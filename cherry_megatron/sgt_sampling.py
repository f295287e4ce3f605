"""Unbiased SGT selection: inclusion probabilities from a policy's scores, Poisson and conditional Poisson draws.

`top` supervises the highest-scoring positions, a biased estimate of the full loss: a position the policy never
picks never gets a gradient. Here every valid position i is supervised with probability
pi_i = min(1, c * s_i^(1/T)) (s_i > 0 the policy's score, T the temperature, c per group so that sum pi = m) and
its loss weighted by 1/pi_i (Horvitz-Thompson), so sum over the selected of l_i / pi_i estimates the sum over all
positions without bias whichever policy scored them; divided by the number of valid positions it estimates the
full-sequence mean loss.

  poisson      independent Bernoulli(pi_i) draws; m = ratio * n real-valued; the count varies (mean m,
               variance sum pi (1 - pi) <= m).
  conditional  conditional Poisson sampling (CPS, Hajek's rejective design): exactly m = round(ratio * n)
               positions, S drawn with P(S) proportional to prod_{i in S} w_i over the subsets of size m.
               The working weights w start at pi / (1 - pi) and are fitted so that the design's inclusion
               probabilities equal pi (log w += logit(pi) - logit(design's pi), as in Chen, Dempster & Liu
               1994; a design's inclusion probabilities come exactly from elementary symmetric polynomials). S is drawn position by position from the elementary
               symmetric polynomials of w (Tille, Sampling Algorithms, 2006, sequential CPS). The loss weights
               are 1 / (the fitted design's own inclusion probabilities), so the estimate stays unbiased
               whatever is left of the fit's error.

Groups are rows: one per sequence (scope=sequence) or the whole micro-batch (scope=batch, poisson only). All of it
is tensor arithmetic on the device with no value read back by the host (CPS walks the positions in order, about
4n small steps per micro-batch with tables of n x m per sequence, the slower mode on a GPU; Poisson is parallel); the uniforms come from the host, seeded by the
sample index, so every tensor-parallel rank draws the same positions. Written by hand: neither torch nor scipy
draws fixed-size unequal-probability samples.
"""
from __future__ import annotations

import math

import torch

FIT_ITERATIONS = 2  # fit steps: max |inclusion - pi| ~1e-7 (1e-5 after one); the weights use the design's own
MIN_LOG_RATIO = -30.0  # a score below e^-30 of its row's largest is raised to it: no valid position gets pi = 0


def inclusion_probabilities(log_scores: torch.Tensor, valid: torch.Tensor, m: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """pi [g, n] (float64) = min(1, c * s^(1/T)) on valid positions, 0 elsewhere, from log s (a policy whose
    score is a log-ratio, as excess is, needs no exp that could overflow), with c per row such that
    sum pi = m [g] (a row with m >= its valid count gets pi = 1 everywhere valid). Water-filling: with the
    scores sorted, the k largest are capped at 1 and c = (m - k) / (sum of the rest) for the smallest k at which
    the largest uncapped one stays <= 1. Unbiased needs pi > 0 wherever a loss is counted: a score that would
    underflow (a loss near 0 at a small T) is floored at e^MIN_LOG_RATIO of the row's largest."""
    logs = (log_scores.double() / temperature).masked_fill(~valid, float("-inf"))
    top = logs.amax(1, keepdim=True).clamp(min=-1e300)  # a row with nothing valid stays all -inf, not nan
    a = (logs - top).clamp(min=MIN_LOG_RATIO).exp().masked_fill(~valid, 0.0)  # in (0, 1]; 0 where invalid
    srt = a.sort(1, descending=True).values
    rest = srt.flip(1).cumsum(1).flip(1)  # rest[:, k] = sum of srt[:, k:]
    k = torch.arange(a.shape[1], device=a.device, dtype=torch.float64)
    m = m.double()[:, None]
    c = (m - k) / rest.clamp(min=1e-300)
    ok = (c * srt <= 1.0 + 1e-12) & (k < m)
    c = c.gather(1, ok.double().argmax(1, keepdim=True))  # the first k that holds (argmax: first maximum)
    pi = c * a
    pi = torch.where(pi > 1.0 - 1e-9, torch.ones_like(pi), pi)  # the capped ones, and one a rounding off 1
    pi = torch.where(m >= valid.sum(1, keepdim=True), torch.ones_like(pi), pi)
    return pi.masked_fill(~valid, 0.0)


def poisson(pi: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return u.to(pi.device, pi.dtype) < pi


def log_esp_suffix(logw: torch.Tensor, max_m: int) -> torch.Tensor:
    """E [g, n+1, max_m+1]: E[:, i, k] = log e_k(w_i, ..., w_{n-1}), the elementary symmetric polynomials of the
    weights from position i on, in logs (their values span hundreds of decades); -inf weights are absent."""
    g, n = logw.shape
    E = torch.full((g, n + 1, max_m + 1), float("-inf"), dtype=logw.dtype, device=logw.device)
    E[:, :, 0] = 0.0
    for i in range(n - 1, -1, -1):
        E[:, i, 1:] = torch.logaddexp(E[:, i + 1, 1:], logw[:, i:i + 1] + E[:, i + 1, :-1])
    return E


def cps_inclusion(logw: torch.Tensor, m: torch.Tensor, max_m: int) -> torch.Tensor:
    """Inclusion probabilities [g, n] of CPS of size m [g] with working weights exp(logw) (-inf: excluded):
    pi_i = w_i e_{m-1}(w without i) / e_m(w), e_{m-1}(w without i) = sum_j e_j(w before i) e_{m-1-j}(w after i).
    From prefix and suffix tables in logs: Chen, Dempster & Liu's recursion over the size, the textbook route,
    loses all precision when the weights are as unequal as a skewed policy's (probabilities of 50 seen here)."""
    return cps_inclusion_and_suffix(logw, m, max_m)[0]


def cps_inclusion_and_suffix(logw: torch.Tensor, m: torch.Tensor, max_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(`cps_inclusion`, the suffix table of the normalized weights that `cps_draw` reuses)."""
    g, n = logw.shape
    logw = logw - logw.amax(1, keepdim=True).clamp(min=-1e300)
    # One pass over the positions builds both tables: the prefix table is the suffix table of the reversed rows.
    both = log_esp_suffix(torch.cat([logw, logw.flip(1)]), max_m)
    suffix, prefix = both[:g], both[g:].flip(1)  # prefix[:, i, k] = log e_k(w_0, ..., w_{i-1})
    j = torch.arange(max(max_m, 1), device=logw.device)
    other = (m[:, None] - 1 - j).clamp(min=0)  # [g, K]: the size left for the positions after i
    after = suffix[:, 1:, :].gather(2, other[:, None, :].expand(g, n, len(j)))
    terms = prefix[:, :n, :len(j)] + after
    terms = terms.masked_fill(~(j[None, :] < m[:, None])[:, None, :], float("-inf"))
    log_em = suffix[:, 0, :].gather(1, m[:, None].clamp(max=max_m))
    return (logw + torch.logsumexp(terms, dim=2) - log_em).exp().nan_to_num(0.0), suffix


def fit_cps(pi: torch.Tensor, m: torch.Tensor, max_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log working weights, the design's inclusion probabilities, its suffix table) for target pi (0 < pi < 1
    where drawn; other positions are excluded) and size m per row."""
    drawn = (pi > 0) & (pi < 1)
    p = pi.clamp(1e-12, 1 - 1e-12)
    logw = torch.where(drawn, torch.logit(p), torch.full_like(p, float("-inf")))
    got, suffix = cps_inclusion_and_suffix(logw, m, max_m)
    for _ in range(FIT_ITERATIONS):
        # A quasi-Newton step: the Jacobian d logit(pi) / d log w taken as the identity, as it is for a Poisson
        # design (pi = w / (1 + w)); CPS is close to one, so the error falls ~100x a step (tests).
        got = got.clamp(1e-300, 1 - 1e-12)
        logw = torch.where(drawn, logw + torch.logit(p) - torch.logit(got), logw)
        got, suffix = cps_inclusion_and_suffix(logw, m, max_m)
    return logw, got, suffix


def cps_draw(logw: torch.Tensor, m: torch.Tensor, u: torch.Tensor, max_m: int,
             suffix: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [g, n]: exactly m [g] positions per row from CPS with weights exp(logw). Position i is taken with
    probability w_i e_{r-1}(w_{i+1:}) / e_r(w_{i:}), r the positions still to take. `suffix`: the table of
    these weights from `fit_cps`, else built here."""
    g, n = logw.shape
    logw = logw - logw.amax(1, keepdim=True).clamp(min=-1e300)
    E = log_esp_suffix(logw, max_m) if suffix is None else suffix
    r = m.clone().long()
    taken = torch.zeros(g, n, dtype=torch.bool, device=logw.device)
    u = u.to(logw.device, logw.dtype)
    for i in range(n):
        num = logw[:, i] + E[:, i + 1].gather(1, (r - 1).clamp(min=0)[:, None])[:, 0]
        den = E[:, i].gather(1, r[:, None])[:, 0]
        take = (r > 0) & (u[:, i] < (num - den).exp())
        taken[:, i] = take
        r = r - take.long()
    return taken


def conditional(pi: torch.Tensor, m: torch.Tensor, u: torch.Tensor, max_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, inclusion probabilities) of exactly m [g] positions per row: those with pi = 1 always, the rest by
    CPS fitted to pi."""
    sure = pi >= 1.0
    rest = m.long() - sure.sum(1)
    logw, got, suffix = fit_cps(pi, rest, max_m)
    mask = sure | cps_draw(logw, rest, u, max_m, suffix)
    return mask, torch.where(sure, torch.ones_like(pi), got)


def poisson_bucket(expected: float, n: int) -> int:
    """Gathered positions of a Poisson draw with `expected` mean count out of n: fixed for a given batch shape,
    so the head's matmuls keep one size. mean + t, t = 6 sqrt(mean) + 12: by Chernoff, P(count >= mean + t) <=
    exp(-t^2 / (2 (mean + t/3))) < 1e-7 at every mean; a draw past it drops its excess, counted in a metric."""
    return min(n, int(math.ceil(expected + 6.0 * math.sqrt(expected) + 12.0)))
