"""Throughput of our trainer against a plain single-process PyTorch loop, same model shape, data and batch.

    .venv/bin/python bench/train_throughput.py [--config tiny] [--steps 12] [--set key=value ...]

Ours: `cherry_megatron.train` run by this script (megatron-core layers, DeepSpeed engine and ZeRO, data
pipeline, logging, checkpoint at the end excluded from the timing). Baseline: a Llama-shaped model of
plain `nn.Linear`/`nn.Embedding` layers trained by `torch.optim.AdamW` on batches cut from the same
token file, with the same micro-batch, accumulation and sequence length. The baseline runs before and
after ours; each side's median step time after warm-up is quoted. CPU figures on a CPU machine.
The last line is one JSON object; `ratio_tokens_per_s` > 1 means ours is faster.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.runs import trainer_step_times  # noqa: E402
from cherry_megatron.config import ModelConfig, load_config  # noqa: E402


class PlainBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        h, hd = c.hidden_size, c.head_dim
        self.nh, self.nkv, self.hd = c.num_heads, c.kv_heads, hd
        self.n1, self.n2 = nn.RMSNorm(h, eps=c.norm_eps), nn.RMSNorm(h, eps=c.norm_eps)
        self.qkv = nn.Linear(h, (c.num_heads + 2 * c.kv_heads) * hd, bias=False)
        self.o = nn.Linear(c.num_heads * hd, h, bias=False)
        self.gate_up = nn.Linear(h, 2 * c.ffn_size, bias=False)
        self.down = nn.Linear(c.ffn_size, h, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        q, k, v = (t.view(b, s, -1, self.hd).transpose(1, 2) for t in (q, k, v))
        rot = lambda t: t * cos + torch.cat((-t[..., self.hd // 2:], t[..., : self.hd // 2]), -1) * sin  # noqa: E731
        a = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        g, u = self.gate_up(self.n2(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u)


class PlainGPT(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(PlainBlock(c) for _ in range(c.num_layers))
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, tokens, labels):
        f = torch.outer(torch.arange(tokens.shape[1]).float(), self.inv_freq)
        emb = torch.cat((f, f), -1)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, emb.cos(), emb.sin())
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


def plain_loop(cfg, steps: int, warmup: int) -> list[float]:
    """Seconds per optimizer step of the plain loop, after `warmup` steps."""
    from cherry_megatron.data.indexed import token_stream

    t = cfg.train
    torch.manual_seed(t.seed)
    model = PlainGPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    stream = torch.from_numpy(token_stream(cfg.data.paths[-1]).astype("int64"))
    accum, mbs, s = t.global_batch_size // t.micro_batch_size, t.micro_batch_size, t.seq_length
    times, offset = [], 0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        for _ in range(accum):
            if offset + mbs * (s + 1) > len(stream):
                offset = 0
            batch = stream[offset: offset + mbs * (s + 1)].view(mbs, s + 1)
            offset += mbs * (s + 1)
            loss = model(batch[:, :-1], batch[:, 1:]) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", dest="overrides", nargs="+", default=[])
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    from cherry_megatron.data.tokenizer import load_tokenizer
    from cherry_megatron.model.gpt import flops_per_token
    from cherry_megatron.preflight import resolve_vocab
    from cherry_megatron.metrics import CPU_PEAK_TFLOPS_PER_THREAD

    resolve_vocab(cfg, load_tokenizer(cfg.data.tokenizer_model).vocab_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    peak = CPU_PEAK_TFLOPS_PER_THREAD * threads * 1e12
    fpt = flops_per_token(cfg.model, cfg.train.seq_length)

    base = plain_loop(cfg, args.steps // 2, args.warmup)
    ours = trainer_step_times(args.config, args.overrides, args.steps, args.warmup)
    torch.set_num_threads(threads)
    base += plain_loop(cfg, args.steps - args.steps // 2, args.warmup)

    res = {"config": args.config, "device": "cpu", "threads": threads, "tokens_per_step": tokens,
           "zero_stage": cfg.parallel.zero_stage}
    for name, times in (("plain", base), ("ours", ours)):
        tps = tokens / statistics.median(times)
        res[f"{name}_tokens_per_s"] = round(tps, 1)
        res[f"{name}_mfu"] = round(tps * fpt / peak, 4)
        print(f"{name:>5}: median step {statistics.median(times):.3f} s over {len(times)} steps, "
              f"{tps:,.0f} tokens/s, MFU {tps * fpt / peak:.1%}", flush=True)
    res["ratio_tokens_per_s"] = round(res["ours_tokens_per_s"] / res["plain_tokens_per_s"], 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
