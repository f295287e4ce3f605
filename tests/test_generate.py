"""KV-cached generation: cached passes equal the training forward (dense, recurrent with LoRA, MoEE), chunked
prefill, crop and recompute, early depths, sampling; the sparse (MoA) model too."""
import json

import pytest
import torch

from cherry_megatron.config import load_config
from cherry_megatron.generate.cache import ModelCache, full_logits, run_units
from cherry_megatron.generate.decode import generate, prefill
from cherry_megatron.generate.sampling import Sampler
from cherry_megatron.model import build_model

VOCAB = 1000  # below the padded 1024: the padded rows must never be chosen
KINDS = {
    "dense": ("tiny", []),
    "recurrent": ("recurrent-tiny", ["recurrent.lora_rank=4", "recurrent.exit_depths=[]"]),
    "moee": ("tiny", ["moee.num_experts=2", "moee.top_k=2"]),  # capacity 0: dropless, no token depends on others
    "smoe": ("smoe-tiny", ["smoe.num_experts=4"]),  # MoA's k queries attend to the shared cached keys
}


def _model(kind: str):
    preset, sets = KINDS[kind]
    cfg = load_config(preset, ["model.vocab_size=1024", *sets])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # nothing at its neutral init: norms, LoRA B and iteration embeddings all matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "lora" in name or "iter_embed" in name or name.endswith("bias"):
                p.normal_(0, 0.05)
    return cfg, model


@pytest.fixture(scope="module", params=list(KINDS))
def model(request, world_of_one):
    return _model(request.param)[1]


def _reference(model, tokens, depth=0):
    with torch.no_grad():
        return model(tokens, depth=depth).logits[..., :VOCAB].float()


def test_cached_decoding_equals_the_uncached_forward(model):
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 61))
    ref = _reference(model, tokens)
    cache = ModelCache(model, 2, 64)
    with torch.no_grad():
        got = [prefill(model, tokens[:, :37], cache, VOCAB)]
        for t in range(37, 61):  # 24 decode steps, one token each
            got.append(full_logits(model, run_units(model, model.embed(tokens[:, t:t + 1]), cache, t), VOCAB))
    got = torch.cat(got, dim=1)
    assert (got - ref).abs().max().item() <= 1e-5
    assert cache.lengths() == [61] * len(cache)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_equals_one_prefill(model, chunk):
    tokens = torch.randint(0, VOCAB, (1, 29), generator=torch.Generator().manual_seed(2))
    one, chunked = ModelCache(model, 1, 32), ModelCache(model, 1, 32)
    with torch.no_grad():
        a = prefill(model, tokens, one, VOCAB)
        b = prefill(model, tokens, chunked, VOCAB, chunk=chunk)
    assert (a - b).abs().max().item() <= 1e-5
    for x, y in zip(one.units, chunked.units):
        assert x.length == y.length == 29
        assert torch.allclose(x.k[:, :, :29], y.k[:, :, :29], atol=1e-6) and torch.allclose(x.v, y.v, atol=1e-6)


def test_crop_and_recompute_equals_the_original(model):
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    cache = ModelCache(model, 1, 48)
    with torch.no_grad():
        first = prefill(model, tokens, cache, VOCAB)
        keys = [c.k[:, :, :40].clone() for c in cache.units]
        cache.crop(25)
        assert cache.lengths() == [25] * len(cache)
        again = prefill(model, tokens[:, 25:], cache, VOCAB)
    assert (again - first[:, 25:]).abs().max().item() <= 1e-5
    assert all(torch.allclose(k, c.k[:, :, :40], atol=1e-6) for k, c in zip(keys, cache.units))


def test_cached_early_depth_equals_the_forward_at_that_depth(model):
    tokens = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    depth = len(model.units()) // 2
    cache = ModelCache(model, 1, 24)
    with torch.no_grad():
        got = prefill(model, tokens[:, :12], cache, VOCAB, depth=depth)
        got = torch.cat([got, prefill(model, tokens[:, 12:], cache, VOCAB, chunk=3, depth=depth)], dim=1)
    assert (got - _reference(model, tokens, depth)).abs().max().item() <= 1e-5
    assert cache.lengths() == [20] * depth + [0] * (len(cache) - depth)  # the deeper units were not run


def test_a_pass_from_the_wrong_offset_is_refused(model):
    cache = ModelCache(model, 1, 8)
    with torch.no_grad(), pytest.raises(AssertionError, match="holds 0 positions, the pass starts at 3"):
        run_units(model, model.embed(torch.zeros(1, 1, dtype=torch.long)), cache, 3)


def test_greedy_generation_equals_argmax_of_the_uncached_forward(model):
    prompt = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    got = generate(model, prompt, 12, VOCAB, Sampler())
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(_reference(model, torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]
    eos = got[3]  # stops at the end-of-document token, which it keeps
    assert generate(model, prompt, 12, VOCAB, Sampler(), eos=eos) == got[:got.index(eos) + 1]


def test_nucleus_sampling_keeps_to_the_nucleus_and_a_seed_repeats():
    logits = torch.tensor([[4.0, 3.0, 2.5, 0.0, -1.0, -2.0]]).repeat(400, 1)
    probs = logits[0].softmax(-1)
    draws = Sampler(temperature=1.0, top_p=0.9, seed=7)(logits)
    nucleus = int((probs.cumsum(-1) - probs < 0.9).sum())  # smallest prefix whose mass reaches 0.9
    assert set(draws.tolist()) == set(range(nucleus))
    again = Sampler(temperature=1.0, top_p=0.9, seed=7)(logits)
    assert torch.equal(draws, again)
    assert torch.equal(Sampler()(logits), torch.zeros(400, dtype=torch.long))
    with pytest.raises(ValueError):
        Sampler(temperature=1.0, top_p=0.0)


def _heldout_prompts(n: int) -> list[str]:
    """The first line of n English and code held-out documents (at most 160 characters)."""
    import json

    from conftest import DATA

    docs = [json.loads(line) for line in (DATA / "corpus" / "heldout.jsonl").read_text().splitlines()]
    docs = [d for d in docs if d.get("lang") in ("en", "code")]
    return [d["text"].strip().splitlines()[0][:160] for d in docs[:n]]


def test_greedy_tokens_on_smollm2_equal_transformers_generate(tmp_path):
    """The real client: transformers' generate(do_sample=False) on the published directory, against our CLI."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import DATA, run_cli

    model_dir = DATA / "models" / "smollm2-135m"
    if not (DATA / "models" / ".built").exists():
        pytest.fail("the shipped teacher is missing: run `make model` (make test does it)")
    prompts = _heldout_prompts(3)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    proc = run_cli(["-m", "cherry_megatron.generate", "--load", str(model_dir), "--prompt-file",
                    str(tmp_path / "prompts.txt"), "--max-new-tokens", "24", "--greedy", "--prefill-chunk", "16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["prompt"] for o in ours] == prompts
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for o, text in zip(ours, prompts):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
        assert o["tokens"] == ref[0, ids.shape[1]:].tolist()
        assert o["text"] == tok.decode(o["tokens"])


@pytest.mark.slow
def test_generation_at_tp2_equals_tp1_greedy_and_sampled(baseline):
    from conftest import run_cli

    outs = {}
    for mode in (["--greedy"], ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]):
        for nproc in (1, 2):
            proc = run_cli(["-m", "cherry_megatron.generate", "--load", str(baseline), "--prompt", "서울은",
                            "The model", "--max-new-tokens", "20", *mode], nproc=nproc)
            assert proc.returncode == 0, proc.stderr[-3000:]
            outs[mode[0], nproc] = [json.loads(line)["tokens"] for line in proc.stdout.splitlines()]
        assert outs[mode[0], 1] == outs[mode[0], 2] and len(outs[mode[0], 1]) == 2
    assert outs["--greedy", 1] != outs["--temperature", 1]
    proc = run_cli(["-m", "cherry_megatron.generate", "--load", str(baseline), "--prompt", "서울은", "The model",
                    "--max-new-tokens", "20", "--speculative-exit", "1", "--draft-tokens", "3"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [x["tokens"] for x in lines] == outs["--greedy", 1] and 0 <= lines[0]["speculative"]["acceptance"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--prompt", " "], "a prompt is empty"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", "x", "--greedy", "--temperature", "0.5"], "contradict"),
    (["--prompt", "x", "--top-p", "0"], "--top-p in (0, 1]"),
    (["--prompt-file", "/nonexistent/prompts.txt"], "cannot read --prompt-file"),
    (["--prompt", "x", "--speculative-exit", "2", "--draft-tokens", "0"], "--draft-tokens must be >= 1"),
    (["--prompt", "x", "--speculative-exit", "2", "--temperature", "0.7"], "decodes greedily"),
    (["--prompt", "x", "--speculative-exit", "2"], "the model has 2 layer units, so the exit must lie in 1..1"),
])
def test_bad_generation_arguments_are_one_error(baseline, args, message):
    from conftest import error_lines, run_cli

    proc = run_cli(["-m", "cherry_megatron.generate", "--load", str(baseline), *args])
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(error_lines(proc)) == 1 and message in error_lines(proc)[0], proc.stderr[-2000:]


@pytest.fixture(scope="module", params=["dense", "recurrent"])
def deep_model(request, world_of_one):
    preset, sets = KINDS[request.param]
    cfg = load_config(preset, ["model.vocab_size=1024", "model.num_layers=8", *sets])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name or "iter_embed" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("draft_tokens", [1, 2, 4, 8])
def test_self_speculative_output_equals_full_depth_greedy(deep_model, draft_tokens):
    from cherry_megatron.generate.speculative import SpeculativeStats, speculative_generate

    depth = len(deep_model.units())
    prompt = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(6)).tolist()
    greedy = generate(deep_model, prompt, 20, VOCAB, Sampler())
    for exit_depth in sorted({1, 2, depth // 4, depth // 2, depth - 1}):
        stats = SpeculativeStats()
        got = speculative_generate(deep_model, prompt, 20, VOCAB, exit_depth, draft_tokens, stats=stats)
        assert got == greedy, (exit_depth, draft_tokens)
        assert stats.drafted == stats.rounds * draft_tokens and stats.emitted == len(got) - 1
    eos = greedy[5]
    assert speculative_generate(deep_model, prompt, 20, VOCAB, 2, draft_tokens, eos=eos) == greedy[:greedy.index(eos) + 1]


def test_speculative_accepts_every_draft_when_the_deep_units_are_identities(world_of_one):
    """Zero output projections make units D.. identities: drafts at D are the full model's, all accepted."""
    from cherry_megatron.generate.speculative import SpeculativeStats, speculative_generate

    cfg = load_config("tiny", ["model.vocab_size=1024", "model.num_layers=6"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for layer in model.layers[3:]:
            layer.attn.o.weight.zero_()
            layer.mlp.down.weight.zero_()
    prompt = list(range(5, 15))
    stats = SpeculativeStats()
    got = speculative_generate(model, prompt, 25, VOCAB, 3, 4, stats=stats)
    assert got == generate(model, prompt, 25, VOCAB, Sampler())
    assert stats.acceptance == 1.0 and stats.tokens_per_round == 4.0


def test_speculative_arguments_are_checked(deep_model):
    from cherry_megatron.generate.speculative import speculative_generate

    depth = len(deep_model.units())
    for d, k, message in [(depth, 2, "exit depth must lie in 1.."), (0, 2, "exit depth"), (2, 0, "draft length")]:
        with pytest.raises(ValueError, match=message):
            speculative_generate(deep_model, [1, 2], 4, VOCAB, d, k)


@pytest.fixture(scope="module")
def looped(world_of_one):
    """A recurrent model of 2 blocks unrolled to 6 positions, with LoRA, norms and embeddings per position."""
    cfg = load_config("recurrent-tiny", ["model.vocab_size=1024", "model.num_layers=6", "recurrent.num_blocks=2",
                                         "recurrent.lora_rank=4", "recurrent.exit_depths=[]"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "lora" in name or "iter_embed" in name or name.endswith("bias"):
                p.normal_(0, 0.05)
    return model


def _prompts(n):
    g = torch.Generator().manual_seed(8)
    return [torch.randint(0, VOCAB, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("schedule", ["depthwise", "sequence"])
def test_depthwise_batching_without_exits_equals_per_request_greedy(looped, schedule):
    from cherry_megatron.generate.depthwise import DepthwiseBatcher

    prompts = _prompts(5)
    batcher = DepthwiseBatcher(looped, rows=2, max_len=32, vocab=VOCAB, schedule=schedule)
    done = batcher.run(prompts, 9)  # 5 requests through 2 rows: rows are refilled
    assert [r.tokens for r in done] == [generate(looped, p, 9, VOCAB, Sampler()) for p in prompts]
    assert set(batcher.stats.exits) == {6}
    if schedule == "depthwise":  # rows at different positions of one block share a tick
        assert batcher.stats.unit_rows / batcher.stats.ticks > 1


def test_depthwise_exits_give_the_greedy_tokens_of_the_shallow_model(looped):
    """Threshold 0: every token after the first (the prefill's, full depth) exits at depth 2. Positions below
    2 never read the copied-up keys, so the tokens are those of cached greedy decoding at depth 2."""
    from cherry_megatron.generate.depthwise import DepthwiseBatcher

    prompts = _prompts(3)
    batcher = DepthwiseBatcher(looped, rows=3, max_len=32, vocab=VOCAB, exit_depths=[2, 4], threshold=0.0)
    done = batcher.run(prompts, 7)
    for req, prompt in zip(done, prompts):
        cache = ModelCache(looped, 1, 32)
        with torch.no_grad():
            seq = [int(prefill(looped, torch.tensor([prompt]), cache, VOCAB)[0, -1].argmax())]
            while len(seq) < 7:
                x = run_units(looped, looped.embed(torch.tensor([[seq[-1]]])), cache, cache.units[0].length, 0, 2)
                seq.append(int(full_logits(looped, x, VOCAB)[0, -1].argmax()))
        assert req.tokens == seq and req.depths == [6] + [2] * 6
    assert batcher.stats.mean_depth == 2.0


def test_copy_state_keys_are_what_the_deeper_position_computes_from_the_exited_stream(looped):
    from cherry_megatron.generate.cache import KVCache
    from cherry_megatron.generate.depthwise import DepthwiseBatcher

    batcher = DepthwiseBatcher(looped, rows=1, max_len=16, vocab=VOCAB, exit_depths=[2], threshold=0.0)
    batcher.run([[5, 6, 7]], 2)  # the second token exits at 2: positions 2..5 get copied-up keys at index 3
    assert batcher.stats.exits[2] == 1
    # The exited stream at depth 2 of token 1 (index 3), through position 4's block with a plain cache.
    tokens = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        cache = ModelCache(looped, 1, 16)
        token = int(prefill(looped, tokens, cache, VOCAB)[0, -1].argmax())
        x = run_units(looped, looped.embed(torch.tensor([[token]])), cache, 3, 0, 2)
        plain = KVCache(1, looped.layers[0].attn.n_kv, 16, looped.layers[0].attn.head_dim, torch.float32,
                        torch.device("cpu"))
        plain.append(batcher.kv.k[4, :1, :, :3], batcher.kv.v[4, :1, :, :3])
        looped.units()[4].call(x, looped.context(x, 3), plain)
    assert torch.allclose(plain.k[0, :, 3], batcher.kv.k[4, 0, :, 3], atol=1e-6)
    assert torch.allclose(plain.v[0, :, 3], batcher.kv.v[4, 0, :, 3], atol=1e-6)


def test_depthwise_batching_refuses_a_dense_model(model):
    from cherry_megatron.generate.depthwise import DepthwiseBatcher

    if model.rcfg is not None and not hasattr(model.layers[0].mlp, "route"):
        pytest.skip("a recurrent model is what it takes")
    with pytest.raises(ValueError, match="needs a recurrent model"):
        DepthwiseBatcher(model, rows=2, max_len=8, vocab=VOCAB)


def test_teacher_forced_depthwise_loss_at_full_depth_is_the_forward_loss(looped):
    from cherry_megatron.generate.depthwise import DepthwiseBatcher

    windows = torch.randint(0, VOCAB, (3, 14), generator=torch.Generator().manual_seed(9))
    prompts, forced = windows[:, :6].tolist(), windows[:, 6:].tolist()
    done = DepthwiseBatcher(looped, rows=2, max_len=32, vocab=VOCAB).run(prompts, 8, forced)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(_reference(looped, windows[:, :-1])[:, 5:].reshape(-1, VOCAB),
                                                windows[:, 6:].reshape(-1), reduction="none").view(3, 8)
    for req, row in zip(done, ref):
        assert req.tokens == req.forced
        assert req.nll == pytest.approx(row.tolist(), abs=1e-4)
