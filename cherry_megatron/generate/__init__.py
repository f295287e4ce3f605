"""Generation: KV-cached decoding of any model here (dense, recurrent, MoEE), greedy or sampled.

    cache.py     preallocated keys/values per layer unit (a recurrent model: per position), cached passes
    sampling.py  greedy and temperature / top-p choice of the next token from vocab-parallel logits
    decode.py    prefill (optionally chunked) + one token per step, stopping at the end-of-document token
    speculative.py  self-speculative greedy decoding (LayerSkip): draft at an exit depth, verify with the rest
    depthwise.py continuous depth-wise batching of a recurrent model (RRT), copy-state KV for exited tokens
    __main__.py  `python -m cherry_megatron.generate` (cli/generate.py)

The training forward is not touched: a cached pass is the same units called with a context that carries
the caches and the chunk's position offset (model/layers.py `LayerContext`).
"""
