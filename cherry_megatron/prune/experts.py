"""Task-specific expert pruning by merging: UNCURL (arXiv 2409.01483, Algorithm 1) and its frequency baselines,
on a routed model's full (TP=1) state dict (model/moee.py, model/smoe.py).

Per routed mixture (a layer's MoE MLP; a JetMoE model's Mixture of Attention too, see below), from calibration
tokens of the target task: router logits H [N, E] and activation frequency (top-k assignments per expert), then
  similarity    S_ij = (1 + cos(H_i, H_j)) / 2 over the expert columns of H;
  uncurl        spectral clustering of S into D clusters (Ng-Jordan-Weiss); in each the most used expert is the
                anchor and every other member is aligned to it by the neuron permutation that best matches its
                weights (gate and up rows of a neuron move together with its down column), then the cluster is
                the activation-frequency-weighted average of the aligned experts;
  frequency     the D most used experts, unchanged;
  frequency-merge  the D most used are the centres; every other expert joins the centre it is most similar to.
The router keeps one row per cluster: `mean` (the frequency-weighted mean of its members' rows), or `random`.

MoA experts (smoe.attention_experts): smoe.num_experts counts the MoA experts too, so they are merged by the
same method from their own router's logits. They share keys and values, so their weights already live in one
basis (query dim i meets key dim i, output column i reads value dim i): averaged without alignment.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cherry_megatron.errors import ConfigError
from cherry_megatron.model.moee import EXPERTS
from cherry_megatron.prune.slicing import top_k

METHODS = ("uncurl", "frequency", "frequency-merge")
ROUTERS = ("mean", "random")
EXPERT_TENSORS = ("gate_up.weight", "down.weight", "gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B")
_MLP_ROUTER = re.compile(r"^(layers\.\d+\.mlp)\.deepspeed_moe\.gate\.wg\.weight$")
_MOA_ROUTER = re.compile(r"^(layers\.\d+\.attn)\.router\.weight$")


@dataclass
class Usage:
    """What the calibration tokens did in one routed mixture: router logits [N, E], top-k assignments [E]."""
    logits: torch.Tensor
    counts: torch.Tensor


@torch.no_grad()
def calibrate(model, batches: list[torch.Tensor], k: int) -> dict[str, Usage]:
    """{mixture prefix (`layers.3.mlp`, `layers.3.attn`): Usage} from forwards of the full (TP=1, EP=1) model
    in eval mode. A recurrent model's shared block adds one call per position it runs at."""
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
        seen.setdefault(name, []).append(F.linear(x.reshape(-1, x.shape[-1]).float(), weight.float()))

    hooks, patched = [], []
    for b, block in enumerate(model.layers):
        if hasattr(block.mlp, "deepspeed_moe"):  # DeepSpeed's gate is called with the routed tokens [N, d]
            hooks.append(block.mlp.deepspeed_moe.gate.register_forward_hook(
                lambda m, args, out, name=f"layers.{b}.mlp": record(name, args[0], m.wg.weight)))
        if hasattr(block.attn, "router"):
            # The MoA reads its router's weight inside `route` without calling the module: no hook fires there,
            # so an instance attribute shadows the method for the calibration (deleted below).
            moa, route = block.attn, block.attn.route

            def wrapped(x, *a, route=route, moa=moa, name=f"layers.{b}.attn", **kw):
                record(name, x, moa.router.weight)
                return route(x, *a, **kw)
            moa.route = wrapped
            patched.append(moa)
    try:
        model.eval()
        for tokens in batches:
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
        for moa in patched:
            del moa.route
    out = {}
    for name, parts in seen.items():
        logits = torch.cat(parts)
        counts = torch.bincount(logits.topk(k, dim=-1).indices.reshape(-1), minlength=logits.shape[1])
        out[name] = Usage(logits, counts)
    return out


def similarity(logits: torch.Tensor) -> torch.Tensor:
    """S [E, E] = (1 + cos of the experts' logit columns) / 2: symmetric, in [0, 1], unit diagonal."""
    h = F.normalize(logits.double(), dim=0)
    s = ((1 + h.T @ h) / 2).clamp(0, 1)
    s = (s + s.T) / 2
    return s.fill_diagonal_(1.0)


def spectral_clusters(s: torch.Tensor, d: int, seed: int) -> list[list[int]]:
    """Ng-Jordan-Weiss spectral clustering of the affinity `s` into exactly d non-empty clusters, each sorted,
    ordered by their first member. The diagonal is kept (NJW zero it): every degree is then >= 1, so an expert
    dissimilar to all others cannot divide by zero."""
    a = s.double().numpy()
    inv = 1 / np.sqrt(a.sum(1))
    _, vecs = np.linalg.eigh(inv[:, None] * a * inv[None, :])  # eigenvalues ascending
    x = vecs[:, -d:]
    # Rows normalised: k-means then sees directions only (a sign or rotation of the eigenbasis moves no distance)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = kmeans(x, d, seed)
    groups = [sorted(np.flatnonzero(labels == c).tolist()) for c in range(d)]
    return sorted(groups)


def kmeans(x: np.ndarray, k: int, seed: int, restarts: int = 10, iters: int = 100) -> np.ndarray:
    """Labels [n] of Lloyd's k-means with k-means++ starts from one seeded generator, the lowest-inertia restart
    (the first among equals). No cluster is left empty (see _fill_empty).
    By hand because D clusters must come out as exactly D experts: scipy's kmeans2 leaves a cluster empty (with
    a warning) or raises, and has no restarts; scipy's kmeans drops empty clusters; sklearn is not a requirement."""
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        centres = _plusplus(x, k, rng)
        labels = None
        for _ in range(iters):
            dist = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
            new = _fill_empty(dist.argmin(1), dist, k)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            centres = np.stack([x[labels == c].mean(0) for c in range(k)])
        inertia = ((x - centres[labels]) ** 2).sum()
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    return best


def _plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = ((x[:, None, :] - np.stack(centres)[None]) ** 2).sum(-1).min(1)
        # Fewer distinct points than k: any point will do, _fill_empty splits the duplicates
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centres.append(x[rng.choice(len(x), p=p)])
    return np.stack(centres)


def _fill_empty(labels: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """Each empty cluster takes the point farthest from its centre among clusters of two or more (the lowest
    index among equals): deterministic, and always possible since k <= n."""
    labels = labels.copy()
    for c in range(k):
        if (labels == c).any():
            continue
        sizes = np.bincount(labels, minlength=k)
        own = np.where(sizes[labels] > 1, dist[np.arange(len(labels)), labels], -np.inf)
        labels[int(np.argmax(own))] = c
    return labels


def plan(usage: Usage, method: str, d: int, seed: int) -> list[list[int]]:
    """The D output experts as groups of input experts, the anchor (most used; the lower index among equals)
    first, ordered by anchor."""
    counts = usage.counts.double()
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    if method == "frequency":
        return [[e] for e in top_k(counts, d).tolist()]
    s = similarity(usage.logits)
    if method == "frequency-merge":
        centres = top_k(counts, d).tolist()
        groups = {c: [c] for c in centres}
        for e in range(len(counts)):
            if e not in groups:
                groups[centres[int(torch.argmax(s[e, centres]))]].append(e)
        return [groups[c] for c in centres]
    out = []
    for members in spectral_clusters(s, d, seed):
        anchor = members[int(torch.argmax(counts[members]))]  # argmax: the first of equals, members sorted
        out.append([anchor] + [e for e in members if e != anchor])
    return sorted(out)


def align(anchor: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """(perm, `other` with its neurons permuted): neuron a of the result is neuron perm[a] of `other`, the
    permutation maximising <W_in^anchor, P W_in^other> + <W_out^anchor, W_out^other P^T>."""
    f = anchor["down.weight"].shape[1]
    a_in, o_in = anchor["gate_up.weight"].double(), other["gate_up.weight"].double()
    cost = (a_in[:f] @ o_in[:f].T + a_in[f:] @ o_in[f:].T
            + anchor["down.weight"].double().T @ other["down.weight"].double())
    _, perm = assignment()(cost.numpy(), maximize=True)
    perm = torch.from_numpy(perm).long()
    return perm, permute(other, perm)


def assignment():
    """scipy's linear_sum_assignment (exact, O(f^3) in C), imported when a merge needs it: `frequency` runs
    where scipy (a requirement) is missing."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ConfigError("merging experts aligns their neurons with scipy.optimize.linear_sum_assignment: "
                          "pip install scipy (or use --method frequency)") from None
    return linear_sum_assignment


def permute(expert: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same function with its neurons reordered: every neuron-indexed axis (gate and up rows, down
    columns, and the LoRA factors on them: gate_up B's rows, down A's columns)."""
    f = perm.numel()
    rows = torch.cat([perm, f + perm])
    out = dict(expert)
    out["gate_up.weight"], out["down.weight"] = expert["gate_up.weight"][rows], expert["down.weight"][:, perm]
    if "gate_up_lora_B" in expert:
        out["gate_up_lora_B"] = expert["gate_up_lora_B"][:, rows]
        out["down_lora_A"] = expert["down_lora_A"][:, :, perm]
    return out


def average(tensors: list[dict[str, torch.Tensor]], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weighted mean of each tensor (fp64 sums, the inputs' dtype back). A LoRA expert's factors are each
    averaged: mean(B) mean(A) is not mean(B A), an approximation that is exact for equal members (as fuse/moee.py
    averages attention LoRA)."""
    w = weights.double() / weights.double().sum()
    return {name: sum(wi * t[name].double() for wi, t in zip(w, tensors)).to(tensors[0][name].dtype)
            for name in tensors[0]}


def _weights(counts: torch.Tensor, group: list[int]) -> torch.Tensor:
    w = counts[group].double()
    return w if w.sum() > 0 else torch.ones(len(group), dtype=torch.float64)  # none used: the plain mean


def merge_mlp(state: dict, prefix: str, groups: list[list[int]], counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The new experts of the MoE MLP `prefix` (`layers.3.mlp`) under their new ids; a singleton passes through."""
    base, out = f"{prefix.rsplit('.', 1)[0]}.{EXPERTS}", {}
    for new, group in enumerate(groups):
        experts = [{n: state[f"{base}.{e}.{n}"] for n in EXPERT_TENSORS if f"{base}.{e}.{n}" in state} for e in group]
        merged = experts[0] if len(group) == 1 else \
            average([experts[0]] + [align(experts[0], x)[1] for x in experts[1:]], _weights(counts, group))
        out.update({f"{base}.{new}.{n}": t for n, t in merged.items()})
    return out


def merge_moa(state: dict, prefix: str, groups: list[list[int]], counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The MoA `prefix` (`layers.3.attn`)'s stacked expert projections, one row per group."""
    return {f"{prefix}.{n}": _mean_rows(state[f"{prefix}.{n}"], groups, counts) for n in ("q_experts", "o_experts")}


def _mean_rows(t: torch.Tensor, groups: list[list[int]], counts: torch.Tensor) -> torch.Tensor:
    """Row i: the frequency-weighted mean of t's rows in group i (a singleton's row itself)."""
    return torch.stack([t[g[0]] if len(g) == 1 else average([{"w": t[e]} for e in g], _weights(counts, g))["w"]
                        for g in groups])


def router_rows(weight: torch.Tensor, groups: list[list[int]], counts: torch.Tensor, router: str,
                init_std: float, generator: torch.Generator) -> torch.Tensor:
    """[D, d]. `mean` warm-starts each merged expert's logit near its members' (their frequency-weighted mean),
    so tokens the task sent to a cluster still tend to reach its merged expert before any retraining."""
    if router == "random":
        return (torch.randn(len(groups), weight.shape[1], generator=generator, dtype=torch.float64)
                * init_std).to(weight.dtype)
    return _mean_rows(weight, groups, counts)


def mixtures(state: dict) -> dict[str, str]:
    """{prefix: router weight name} of every routed mixture in the full state."""
    out = {}
    for name in state:
        m = _MLP_ROUTER.match(name) or _MOA_ROUTER.match(name)
        if m:
            out[m.group(1)] = name
    return out


def prune_experts(state: dict[str, torch.Tensor], cfg, usage: dict[str, Usage], groups: dict[str, list[list[int]]],
                  router: str = "mean", seed: int = 0) -> tuple[dict[str, torch.Tensor], object]:
    """(state with D experts per mixture, its config: num_experts D, top_k min(top_k, D), ep_size 1). Every
    mixture of the state must have its `groups` (all with the same D) and `usage`."""
    from cherry_megatron.config import routing

    if router not in ROUTERS:
        raise ConfigError(f"--router must be one of {', '.join(ROUTERS)}, got '{router}'")
    found = mixtures(state)
    if set(found) != set(groups) or not set(groups) <= set(usage):
        raise ConfigError(f"the calibration saw the routed mixtures {sorted(usage)}, the checkpoint holds "
                          f"{sorted(found)}")
    d = {len(g) for g in groups.values()}
    if len(d) != 1:
        raise ConfigError("every routed mixture must keep the same number of experts")
    # A new kind of expert tensor is an error, not a tensor silently lost. megatron's empty `_extra_state`
    # placeholders (a live model's state_dict has them, a checkpoint not) are dropped: load_into ignores them.
    unknown = sorted(n for n in state if f".{EXPERTS}." in n and not n.endswith("_extra_state")
                     and not n.endswith(tuple(f".{t}" for t in EXPERT_TENSORS)))
    if unknown:
        raise ConfigError(f"expert pruning does not know how to merge {unknown[0]} ({len(unknown)} such tensors)")
    gen = torch.Generator().manual_seed(seed)
    replaced = set(found.values()) | {f"{p}.{n}" for p in found for n in ("q_experts", "o_experts")}
    out = {name: t for name, t in state.items() if name not in replaced and f".{EXPERTS}." not in name}
    for prefix, router_name in sorted(found.items()):  # sorted: --router random draws in one order
        counts, g = usage[prefix].counts, groups[prefix]
        merge = merge_mlp if prefix.endswith(".mlp") else merge_moa
        out.update(merge(state, prefix, g, counts))
        out[router_name] = router_rows(state[router_name], g, counts, router, cfg.model.init_std, gen)
    small = copy.deepcopy(cfg)
    sec = routing(small)
    sec.num_experts, sec.ep_size = d.pop(), 1
    sec.top_k = min(sec.top_k, sec.num_experts)
    small.model.init_from = ""
    return out, small
