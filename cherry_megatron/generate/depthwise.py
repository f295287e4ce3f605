"""Continuous depth-wise batching of a recurrent model (Relaxed Recursive Transformers, arXiv 2410.20672).

Many requests are in flight, one per row of a fixed batch, each token of each row at its own loop position.
A tick runs ONE shared block over every row whose next position is one of that block's positions (the
block with the most such rows goes next): the block's weights are read once for all of them, and each row
brings its position's iteration embedding, norm weights and LoRA factors, gathered per row (a batched
matmul per LoRA, model/layers.py `_low_rank`). After a position at an exit depth, a row whose head is
confident (top probability >= threshold) emits its token there; at full depth it always does. A finished
request's row is refilled from the queue (its prompt prefilled alone, then copied in).

Exited tokens and the KV the deeper positions never computed: copy-state (CALM, arXiv 2207.07061). The
exited stream is copied up: every deeper position's keys and values for that token are computed from it
(that position's embedding, norm, LoRA'd k/v projection and RoPE), so later tokens attend to something at
every position. It is approximate (the true deeper states differ) and costs each deeper position its K/V
projection for the exited token, a fraction of running it. The alternative, deferred recomputation (FREE,
EE-LLM), gives exact KV by running the skipped positions later with the next token; not built.

`sequence` scheduling is the baseline: sequence-wise continuous batching, every active row through every
position each step at full depth, with the same cache, kernels and batch. With exits off the depth-wise
schedule gives the greedy tokens of per-request cached decoding.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from cherry_megatron.generate.cache import ModelCache, full_logits
from cherry_megatron.generate.decode import prefill
from cherry_megatron.model.layers import LayerContext, PositionParams, position_norm, position_params


class RowKV:
    """Keys and values of every (position, row): [positions, rows, kv heads, max_len, head dim]. Row r holds
    `lengths[r]` finished tokens at every position; the token in flight has its entries at index lengths[r]
    at the positions it has passed."""

    def __init__(self, model, rows: int, max_len: int):
        attn, ref = model.layers[0].attn, model.embed.weight
        shape = (len(model.units()), rows, attn.n_kv, max_len, attn.head_dim)
        self.k = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=ref.device)

    def view(self, positions: torch.Tensor, rows: torch.Tensor) -> "TickView":
        return TickView(self, positions, rows)


class TickView:
    """What one block's attention sees in a tick: row i at position positions[i]."""

    def __init__(self, kv: RowKV, positions: torch.Tensor, rows: torch.Tensor):
        self.kv, self.positions, self.rows = kv, positions, rows
        self.at = kv.lengths[rows]

    def attend(self, k: torch.Tensor, v: torch.Tensor):
        """k, v [m, heads, 1, d] of the rows' tokens in flight: stored, then every row attends to its own
        finished tokens and itself (keys padded to the longest row, the rest masked)."""
        kv = self.kv
        kv.k[self.positions, self.rows, :, self.at] = k[:, :, 0]
        kv.v[self.positions, self.rows, :, self.at] = v[:, :, 0]
        n = int(self.at.max()) + 1
        keys = kv.k[self.positions, self.rows, :, :n]
        values = kv.v[self.positions, self.rows, :, :n]
        mask = (torch.arange(n, device=k.device) <= self.at[:, None])[:, None, None, :]
        return keys, values, mask, False


@dataclass
class Request:
    prompt: list[int]
    forced: list[int] | None = None  # teacher forcing: the true continuation, fed instead of the model's choice
    tokens: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # the depth each new token exited at
    nll: list[float] = field(default_factory=list)  # with `forced`: -log p(true next token) where it exited

    def choose(self, probs: torch.Tensor) -> int:
        """The token this request goes on with, from the distribution it exited with (recording its loss)."""
        if self.forced is None:
            return int(probs.argmax())
        target = self.forced[len(self.tokens)]
        self.nll.append(-float(torch.log(probs[target].clamp(min=1e-30))))
        return target


@dataclass
class DepthwiseStats:
    ticks: int = 0
    unit_rows: int = 0  # sum over ticks of the rows a block ran
    exits: Counter = field(default_factory=Counter)  # exit depth -> tokens

    @property
    def mean_depth(self) -> float:
        n = sum(self.exits.values())
        return sum(d * c for d, c in self.exits.items()) / max(1, n)


class DepthwiseBatcher:
    def __init__(self, model, rows: int, max_len: int, vocab: int, exit_depths: list[int] = (),
                 threshold: float | None = None, schedule: str = "depthwise", eos: int | None = None):
        """`exit_depths` (layer units after which a confident row may stop) with `threshold`; None: no exits.
        `schedule`: depthwise (one block per tick, RRT) or sequence (every row through every position)."""
        if model.rcfg is None or hasattr(model.layers[0].mlp, "route"):
            raise ValueError("depth-wise batching needs a recurrent model (shared blocks, not routed ones)")
        if schedule not in ("depthwise", "sequence"):
            raise ValueError(f"unknown schedule {schedule}")
        self.model, self.rows, self.max_len, self.vocab, self.eos = model, rows, max_len, vocab, eos
        self.depth = len(model.units())
        self.exits = set(exit_depths) if threshold is not None and schedule == "depthwise" else set()
        if any(not 1 <= d < self.depth for d in self.exits):
            raise ValueError(f"exit depths must lie in 1..{self.depth - 1}")
        self.threshold, self.schedule = threshold, schedule
        self.blocks = torch.tensor(model.schedule, device=model.embed.weight.device)
        self.cos, self.sin = model.rope(max_len, model.embed.weight.device, model.embed.weight.dtype)
        self.kv = RowKV(model, rows, max_len)
        self.stats = DepthwiseStats()

    @torch.no_grad()
    def run(self, prompts: list[list[int]], max_new_tokens: int, forced: list[list[int]] | None = None) -> list[Request]:
        """Every prompt's new tokens (greedy), `max_new_tokens` each or up to the end-of-document token. With
        `forced` (each prompt's true continuation, >= max_new_tokens long) the true tokens are fed and each
        request's `nll` is the held-out loss of the exits the confidence rule chose."""
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + max_new_tokens > self.max_len:
                raise ValueError(f"prompt {i}: {len(p)} + {max_new_tokens} new tokens exceed the cache's {self.max_len}")
            if forced and len(forced[i]) < max_new_tokens:
                raise ValueError(f"forced continuation {i} holds {len(forced[i])} tokens, fewer than {max_new_tokens}")
        queue = [Request(list(p), list(f) if forced else None) for p, f in zip(prompts, forced or [None] * len(prompts))]
        todo, slots = list(queue), [None] * self.rows
        device = self.model.embed.weight.device
        stream = torch.zeros(self.rows, 1, self.model.cfg.hidden_size, dtype=self.kv.k.dtype, device=device)
        position = torch.zeros(self.rows, dtype=torch.long, device=device)
        while True:
            for r in range(self.rows):
                if slots[r] is None and todo:
                    slots[r] = todo.pop(0)
                    stream[r] = self._admit(r, slots[r])
                    position[r] = 0
            active = [r for r in range(self.rows) if slots[r] is not None and not self._done(slots[r], max_new_tokens)]
            for r in range(self.rows):
                if slots[r] is not None and r not in active:
                    slots[r] = None
            if not active:
                if todo:
                    continue
                return queue
            if self.schedule == "sequence":
                for p in range(self.depth):
                    stream, position = self._tick(active, stream, position, slots, max_new_tokens)
            else:
                stream, position = self._tick(active, stream, position, slots, max_new_tokens)

    def _done(self, req: Request, max_new: int) -> bool:
        eos = self.eos is not None and req.forced is None and req.tokens and req.tokens[-1] == self.eos
        return len(req.tokens) >= max_new or eos

    def _admit(self, r: int, req: Request) -> torch.Tensor:
        """Prefill `req` alone (full depth), copy its keys/values into row r; returns its first token's stream."""
        n = len(req.prompt)
        cache = ModelCache(self.model, 1, n)
        logits = prefill(self.model, torch.tensor([req.prompt], device=self.kv.k.device), cache, self.vocab,
                         last_only=True)
        for p, c in enumerate(cache.units):
            self.kv.k[p, r, :, :n], self.kv.v[p, r, :, :n] = c.k[0, :, :n], c.v[0, :, :n]
        self.kv.lengths[r] = n
        token = req.choose(torch.softmax(logits[0, -1], dim=-1))
        req.tokens.append(token)
        req.depths.append(self.depth)
        return self.model.embed(torch.tensor([[token]], device=self.kv.k.device))[0]

    def _tick(self, active, stream, position, slots, max_new):
        model = self.model
        act = torch.tensor(active, device=stream.device)
        if self.schedule == "sequence":
            rows = act
            block = int(self.blocks[position[rows[0]]])
        else:  # the block with the most rows waiting at one of its positions
            waiting = self.blocks[position[act]]
            block = int(torch.bincount(waiting).argmax())
            rows = act[waiting == block]
        pos = position[rows]
        x = stream[rows]
        params = self._position_params(pos)
        at = self.kv.lengths[rows]
        ctx = LayerContext(self.cos[at][:, None, None, :], self.sin[at][:, None, None, :])
        x = model.layers[block](x, ctx, params, self.kv.view(pos, rows))
        stream[rows] = x
        self.stats.ticks += 1
        self.stats.unit_rows += len(rows)
        depth = pos + 1
        check = [i for i, d in enumerate(depth.tolist()) if d == self.depth or d in self.exits]
        position[rows] = depth
        if check:
            idx = torch.tensor(check, device=x.device)
            probs = torch.softmax(full_logits(model, x[idx], self.vocab)[:, -1], dim=-1)
            top = probs.max(dim=-1).values
            for j, i in enumerate(check):
                d, r = int(depth[i]), int(rows[i])
                if d < self.depth and float(top[j]) < self.threshold:
                    continue
                if d < self.depth:
                    self._copy_state(r, d, x[i])
                self.kv.lengths[r] += 1
                req = slots[r]
                token = req.choose(probs[j])
                req.tokens.append(token)
                req.depths.append(d)
                self.stats.exits[d] += 1
                position[r] = 0
                stream[r] = model.embed(torch.tensor([[token]], device=x.device))[0]
        return stream, position

    def _position_params(self, pos: torch.Tensor) -> PositionParams:
        """Each row's position parameters, gathered (model/layers.py `position_params` indexed by a tensor of
        positions): embeddings and norms as [m, 1, h] to broadcast over the row's stream, LoRA [m, ...]."""
        m = self.model
        p = position_params(m, pos, m.rcfg, m.lora_projections, 0)
        return p._replace(embed=p.embed[:, None, :] if p.embed is not None else None,
                          norms=tuple(w[:, None, :] for w in p.norms) if p.norms is not None else None)

    def _copy_state(self, r: int, exit_depth: int, x: torch.Tensor) -> None:
        """Keys/values of row r's exited token at positions exit_depth.. from its exited stream x [1, h]."""
        model, at = self.model, int(self.kv.lengths[r])
        cos, sin = self.cos[at:at + 1], self.sin[at:at + 1]
        for p in range(exit_depth, self.depth):
            block, pp = model.layers[model.schedule[p]], model.position(p)
            h = x[None] + pp.embed if pp.embed is not None else x[None]
            a = block.attn_norm(h) if pp.norms is None else position_norm(h, pp.norms[0], block.attn_norm.eps)
            k, v = block.attn.keys_values(a, cos, sin, pp.lora.get("kv") if pp.lora else None)
            self.kv.k[p, r, :, at] = k[0, :, 0]
            self.kv.v[p, r, :, at] = v[0, :, 0]
