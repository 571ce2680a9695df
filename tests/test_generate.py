"""KV-cache decoding against full recomputation and transformers' greedy generate; the
sampling filters on hand-made distributions; seeds, stop strings and error paths."""

import math

import pytest
import torch
import transformers

from gpt import GPT, ModelConfig
from gpt.data.tokenizer import get_tokenizer
from gpt.generate import (
    DecodeStep,
    check_sampling,
    decode,
    encode_prompt,
    generate,
    next_token,
    sample_texts,
    top_k_filter,
    top_p_filter,
    visible_text,
)
from gpt.model import KVCache

transformers.logging.set_verbosity_error()
SMALL = dict(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=32)
SWITCHES = {
    "learned": {},
    "sinusoidal": dict(position_encoding="sinusoidal"),
    "rope": dict(position_encoding="rope"),
    "gqa": dict(n_kv_head=2),
    "mqa-rope-post": dict(n_kv_head=1, position_encoding="rope", norm_position="post"),
}


def make(seed=0, **kw):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**SMALL, **kw})).eval()
    with torch.no_grad():  # larger weights than GPT-2's init, so that attention is not uniform
        for p in model.parameters():
            p.mul_(3.0)
    return model


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_kv_cache_logits_equal_full_recomputation(switch, backend):
    model = make(attention=backend, **SWITCHES[switch])
    idx = torch.randint(0, SMALL["vocab_size"], (3, SMALL["block_size"]))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        for prefill in (1, 7):
            cache = KVCache(model.cfg, batch_size=3)
            steps = [model(idx[:, :prefill], kv_cache=cache)]
            steps += [
                model(idx[:, t : t + 1], kv_cache=cache) for t in range(prefill, idx.shape[1])
            ]
            assert cache.length == idx.shape[1]
            assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("switch", ["learned", "rope", "gqa"])
def test_greedy_decoding_with_cache_equals_recomputation_past_block_size(switch):
    model = make(seed=1, **SWITCHES[switch])
    idx = torch.randint(0, SMALL["vocab_size"], (2, 5))
    new = 3 * SMALL["block_size"]  # the window slides many times
    cached = generate(model, idx, new, temperature=0)
    recomputed = generate(model, idx, new, temperature=0, use_cache=False)
    assert cached.shape == (2, 5 + new)
    assert torch.equal(cached, recomputed)


def test_window_keep_rebuilds_the_cache_from_the_last_tokens():
    model, block, keep = make(seed=2, position_encoding="rope"), SMALL["block_size"], 10
    idx = torch.randint(0, SMALL["vocab_size"], (2, 4))
    got = generate(model, idx, 2 * block, temperature=0, window_keep=keep)
    # reference: recompute the window from scratch; it starts over at the last `keep` tokens
    # whenever it would exceed block_size
    seq, start = idx, 0
    with torch.no_grad():
        while seq.shape[1] < got.shape[1]:
            if seq.shape[1] - start > block:
                start = seq.shape[1] - keep
            token = model(seq[:, start:])[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], dim=1)
    assert torch.equal(got, seq)
    with pytest.raises(
        ValueError, match=r"--window-keep must be in \[1, block_size = 24\], got 25"
    ):
        generate(model, idx, 1, window_keep=25)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_chunks_of_several_tokens_after_a_filled_cache_equal_full_recomputation(switch, backend):
    """Chunked prefill / a shared prefix: T new tokens after S - T cached ones attend with the
    bottom-right aligned causal mask; any split gives the logits of one full pass."""
    model = make(attention=backend, **SWITCHES[switch])
    idx = torch.randint(0, SMALL["vocab_size"], (2, SMALL["block_size"]))
    with torch.no_grad():
        full = model(idx)
        for cuts in ([5, 6, 13], [1, 2, 3, 24], [11, 23], [7, 8, 9, 21]):
            cache, start, steps = KVCache(model.cfg, batch_size=2), 0, []
            for end in [*cuts, SMALL["block_size"]]:
                steps.append(model(idx[:, start:end], kv_cache=cache))
                start = end
            got = torch.cat(steps, dim=1)
            assert (got - full).abs().max().item() <= 1e-5, cuts


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_expanded_cache_continues_a_shared_prefix_like_separate_passes(switch):
    model = make(**SWITCHES[switch])
    prefix = torch.randint(0, SMALL["vocab_size"], (1, 9))
    tails = torch.randint(0, SMALL["vocab_size"], (3, 5))
    with torch.no_grad():
        cache = KVCache(model.cfg, batch_size=1)
        model(prefix, kv_cache=cache)
        rows = cache.expand(3)
        got = model(tails, kv_cache=rows)
        expected = model(torch.cat([prefix.expand(3, -1), tails], dim=1))[:, 9:]
    assert rows.length == 14 and cache.length == 9
    assert (got - expected).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="expand copies a one-row cache, this one has 3"):
        rows.expand(2)


def test_kv_cache_refuses_overflow():
    model = make()
    cache = KVCache(model.cfg, batch_size=1)
    model(torch.zeros(1, 20, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="sequence length 25 exceeds block_size 24"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    cache.length = SMALL["block_size"]
    with pytest.raises(ValueError, match="sequence length 25 exceeds block_size 24"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_decode_step_equals_the_model_forward(switch, static):
    """The single-token step, eager (the model's backend on the filled keys) and static
    (whole-cache attention under a mask), against the model's own forward, token by token."""
    model = make(**SWITCHES[switch], norm="rmsnorm", mlp="swiglu", attention="naive")
    idx = torch.randint(0, SMALL["vocab_size"], (2, SMALL["block_size"]))
    with torch.no_grad():
        full = model(idx)
        step = DecodeStep(model, KVCache(model.cfg, batch_size=2), static=static)
        model(idx[:, :4], kv_cache=step.cache)
        step.start()
        for t in range(4, SMALL["block_size"]):
            logits = step.step(idx[:, t : t + 1])
            assert (logits - full[:, t]).abs().max().item() <= 1e-5, t
        assert step.cache.length == SMALL["block_size"] and step.pos.item() == step.cache.length


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    model = make(seed=4, position_encoding="rope", n_kv_head=2)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 3))
    eager = generate(model, idx, 2 * SMALL["block_size"], temperature=0)
    compiled = generate(model, idx, 2 * SMALL["block_size"], temperature=0, compile=True)
    again = generate(model, idx, 10, temperature=0, compile=True)  # the compiled step reused
    assert torch.equal(eager, compiled) and torch.equal(again, eager[:, :13])


def test_ids_past_the_tokenizer_are_never_drawn():
    """A vocabulary padded past the tokenizer's (here 300 > 257 bytes + end-of-text) whose
    padding ids are made the most likely: neither greedy nor sampled decoding draws them."""
    model, tok = make(vocab_size=300), get_tokenizer("bytes")
    with torch.no_grad():
        model.transformer.wte.weight[257:] = model.transformer.wte.weight[:43] * 50.0
    logits = model(torch.tensor([tok.encode("abc")]))[0, -1]
    assert logits.argmax().item() >= 257  # without the mask the padding would win
    for temperature in (0.0, 1.0):
        texts = sample_texts(model, tok, tok.encode("abc"), 4, 30, temperature=temperature)
        assert len(texts) == 4  # bytes' decode raises on an id >= 257
    tokens = generate(model, torch.tensor([[1, 2]]), 40, temperature=2.0, vocab_size=257)
    assert tokens.max().item() < 257


def test_greedy_output_equals_transformers_generate(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=97, n_positions=48, n_embd=48, n_layer=3, n_head=4, bos_token_id=0,
        eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, sharper logits
        for name, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "ln" in name or "bias" in name else p.mul_(4.0)
    hf.save_pretrained(tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = GPT.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.randint(1, 97, (2, 6))
    # no end-of-sequence token: generate must not stop early or pad
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    assert expected.shape == (2, 46)
    assert torch.equal(generate(ours, prompt, 40, temperature=0), expected)


PROBS = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15], [0.5, 0.02, 0.08, 0.2, 0.2 - 1e-6]])


def kept(logits):
    return [set(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in logits]


@pytest.mark.parametrize(
    "k, expected",
    [(1, [{1}, {0}]), (2, [{1, 3}, {0, 3}]), (3, [{1, 3, 4}, {0, 3, 4}]), (9, [set(range(5))] * 2)],
)
def test_top_k_keeps_exactly_the_k_most_likely(k, expected):
    assert kept(top_k_filter(PROBS.log(), k)) == expected


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.3, [{1}, {0}]),  # the most likely token alone already has the mass
        (0.5, [{1, 3}, {0}]),  # row 0: 0.4 < 0.5, so the next one (0.3) is needed
        (0.75, [{1, 3, 4}, {0, 3, 4}]),
        (0.9, [{0, 1, 3, 4}, {0, 2, 3, 4}]),
        (1.0, [set(range(5))] * 2),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(top_p_filter(PROBS.log(), p)) == expected


def test_sampling_draws_only_kept_tokens_with_renormalised_frequencies():
    gen = torch.Generator().manual_seed(0)
    logits = PROBS[:1].log().expand(20000, 5)
    draws = next_token(logits, temperature=1.0, top_k=2, generator=gen)
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.4 / 0.7) < 0.02
    draws = next_token(logits, temperature=1.0, top_p=0.75, generator=gen)
    assert set(draws.tolist()) == {1, 3, 4}
    assert torch.equal(next_token(PROBS.log(), temperature=0.0), torch.tensor([1, 0]))


def test_low_temperature_sharpens_and_high_temperature_flattens():
    gen = torch.Generator().manual_seed(0)
    logits = PROBS[:1].log().expand(20000, 5)
    cold = next_token(logits, temperature=0.1, generator=gen)
    hot = next_token(logits, temperature=100.0, generator=gen)
    assert (cold == 1).float().mean() > 0.9
    assert abs((hot == 2).float().mean().item() - 0.2) < 0.02


def test_same_seed_same_text_and_samples_differ():
    model, tok = make(vocab_size=257), get_tokenizer("bytes")
    kw = dict(num_samples=3, max_new_tokens=20, temperature=1.0, top_k=50)
    a = sample_texts(model, tok, tok.encode("ab"), seed=7, **kw)
    assert a == sample_texts(model, tok, tok.encode("ab"), seed=7, **kw)
    assert a != sample_texts(model, tok, tok.encode("ab"), seed=8, **kw)
    assert len(set(a)) == 3


def test_stop_strings_end_samples_and_streamed_pieces_add_up():
    model, tok = make(seed=3, vocab_size=257), get_tokenizer("bytes")
    free = sample_texts(model, tok, [10], 2, 30, temperature=1.0, seed=5)
    stop = free[0][5:7]  # a string the first sample is known to contain
    pieces = ["", ""]

    def on_text(i, piece):
        pieces[i] += piece

    cut = sample_texts(
        model, tok, [10], 2, 30, temperature=1.0, seed=5, stops=[stop], on_text=on_text
    )
    assert cut[0] == free[0][: free[0].find(stop)]
    assert pieces == cut


@pytest.mark.parametrize(
    "text, stops, final, expected",
    [
        ("hello\n\nworld", ["\n\n"], False, ("hello", True)),
        ("hello\n", ["\n\n"], False, ("hello", False)),  # may become the stop string
        ("hello\n", ["\n\n"], True, ("hello\n", False)),
        ("abcSTO", ["STOP", "x"], False, ("abc", False)),
        ("caf\ufffd", [], False, ("caf", False)),  # half a UTF-8 character
        ("a END b STOP", ["STOP", "END"], False, ("a ", True)),  # the earliest stop wins
    ],
)
def test_visible_text(text, stops, final, expected):
    assert visible_text(text, stops, final) == expected


def test_encode_prompt_empty_and_too_long():
    tok = get_tokenizer("bytes")
    assert encode_prompt(tok, "", 8) == ([tok.eot], None)
    ids, warning = encode_prompt(tok, "abcdefghij", 8)
    assert ids == tok.encode("defghij") and "keeping its last 7" in warning


def test_generate_restores_training_mode_and_decode_validates():
    model = make().train()
    generate(model, torch.zeros(1, 1, dtype=torch.long), 2)
    assert model.training
    with pytest.raises(ValueError, match=r"idx must be \(B, T\) with T >= 1"):
        next(decode(model, torch.zeros(1, 0, dtype=torch.long), 1))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(temperature=-0.5), "--temperature must be a finite number >= 0"),
        (dict(temperature=math.nan), "--temperature"),
        (dict(top_k=0), "--top-k must be an integer >= 1"),
        (dict(top_k=2.5), "--top-k"),
        (dict(top_p=0.0), r"--top-p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"--top-p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_values_name_the_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(**{"temperature": 1.0, "top_k": None, "top_p": None, **kw})


def test_bad_sample_counts_name_the_flag():
    model, tok = make(vocab_size=257), get_tokenizer("bytes")
    with pytest.raises(ValueError, match="--num-samples must be >= 1"):
        sample_texts(model, tok, [1], num_samples=0)
    with pytest.raises(ValueError, match="--max-new-tokens must be >= 0"):
        sample_texts(model, tok, [1], max_new_tokens=-1)
