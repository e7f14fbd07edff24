"""The KV-cache sampler (upbeat/generation.py): its log-probs are the ones PPO needs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from upbeat.generation import (
    PackedLinear,
    draw,
    encode_prompts,
    pack_bf16_linears,
    sample,
    sample_continuations,
)
from upbeat.models import load_policy, position_ids_from_mask, transformer_blocks

PROMPTS = ["i love", "this is the worst day ever, i", "so"]  # different lengths: left padding


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def policy(request):
    return load_policy(str(request.getfixturevalue(request.param)))


def _sample(model, tok, eos=None, seed=0, temperature=0.7, n=8):
    ids, mask = encode_prompts(tok, PROMPTS)
    s = sample(
        model,
        ids,
        mask,
        max_new_tokens=n,
        temperature=temperature,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(seed),
    )
    return ids, mask, s


def test_sampled_logprobs_equal_a_fresh_unpadded_forward(policy):
    # Guards PPO's importance ratio: the recorded log-probs must be log softmax(logits / T) of the
    # same model on the same tokens. Each row is re-run alone, unpadded, with default positions,
    # so this also checks that left padding + cumsum position ids change nothing.
    model, tok = policy
    ids, mask, s = _sample(model, tok, temperature=0.7)
    assert ids.shape[1] > min(len(tok(p)["input_ids"]) for p in PROMPTS)  # some row is padded
    for b in range(len(PROMPTS)):
        prompt = ids[b][mask[b].bool()]
        full = torch.cat([prompt, s.response_ids[b]])[None]
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, len(prompt) - 1 : -1].float() / 0.7
        fresh = torch.log_softmax(logits, -1).gather(1, s.response_ids[b][:, None]).squeeze(1)
        torch.testing.assert_close(s.logprobs[b], fresh, atol=1e-4, rtol=1e-4)


def test_left_padded_logits_equal_unpadded(policy):
    model, tok = policy
    ids, mask = encode_prompts(tok, PROMPTS)
    with torch.no_grad():
        padded = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits
        for b in range(len(PROMPTS)):
            alone = model(input_ids=ids[b][mask[b].bool()][None]).logits[0]
            torch.testing.assert_close(padded[b, mask[b].bool()], alone, atol=1e-4, rtol=1e-4)


def test_tokens_after_eos_are_masked(tiny_llama):
    model, tok = load_policy(str(tiny_llama))
    _, _, free = _sample(model, tok, eos=None, n=10)
    eos = int(free.response_ids[0, 3])  # a token row 0 is known to draw at step 3: call it EOS
    _, _, s = _sample(model, tok, eos=eos, n=10)
    for b in range(len(PROMPTS)):
        hits = (s.response_ids[b] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else s.response_ids.shape[1]
        assert s.response_mask[b, :end].all()  # EOS itself is a real (scored, trained) token
        assert not s.response_mask[b, end:].any()
        assert (s.response_ids[b, end:] == tok.pad_token_id).all()
        assert (s.logprobs[b, end:] == 0).all()
    assert s.response_mask[0].sum() <= 4  # row 0 drew `eos` by step 3 (same seed, same prefix)


def test_sample_continuations_are_reproducible_and_seeded(tiny_llama):
    model, tok = load_policy(str(tiny_llama))
    kw = dict(max_new_tokens=6, temperature=1.0, batch_size=2)
    a = sample_continuations(model, tok, PROMPTS, seed=3, **kw)
    b = sample_continuations(model, tok, PROMPTS, seed=3, **kw)
    c = sample_continuations(model, tok, PROMPTS, seed=4, **kw)
    assert a == b and len(a) == len(PROMPTS)
    assert a != c
    assert all(isinstance(t, str) for t in a)


def test_draw_follows_the_softmax_distribution():
    # Inverse-CDF sampling replaced torch.multinomial: its frequencies must match softmax(logits),
    # including a token of probability 0 (never drawn) and one at the very end of the vocabulary.
    probs = torch.tensor([0.5, 0.0, 0.2, 0.05, 0.25])
    logprobs = torch.log(probs).expand(20_000, -1)  # 20k independent rows of the same distribution
    tokens = draw(logprobs, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=len(probs)).double() / len(tokens)
    assert freq[1] == 0
    stderr = (probs * (1 - probs) / len(tokens)).sqrt().double()
    assert ((freq - probs.double()).abs() <= 4 * stderr + 1e-12).all(), freq
    again = draw(logprobs, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)  # seeded: reproducible


def test_trunk_capture_is_the_input_of_the_block(policy):
    # The hydra trains on the captured trunk: it must be exactly what a full forward feeds the
    # block, at every real position of prompt + response[:-1].
    model, tok = policy
    ids, mask, s = _sample(model, tok, n=6)
    s2 = sample(
        model, ids, mask, max_new_tokens=6, temperature=0.7, eos_token_id=None,
        pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), capture_block=1,
    )  # fmt: skip
    assert torch.equal(s2.response_ids, s.response_ids)  # capturing changes nothing
    full_ids = torch.cat([ids, s.response_ids[:, :-1]], 1)
    full_mask = torch.cat([mask, torch.ones_like(s.response_ids[:, :-1])], 1)
    seen = []
    hook = transformer_blocks(model)[1].register_forward_pre_hook(
        lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        model(input_ids=full_ids, attention_mask=full_mask,
              position_ids=position_ids_from_mask(full_mask))  # fmt: skip
    hook.remove()
    real = full_mask.bool()
    assert s2.trunk.shape == (*full_ids.shape, model.config.hidden_size)
    torch.testing.assert_close(s2.trunk[real], seen[0][real], atol=1e-4, rtol=1e-4)


def test_packed_bf16_linears_sample_what_the_plain_bf16_model_samples(policy):
    # The PPO sampler's bf16 copy multiplies by oneDNN-prepacked weights: same parameters (names,
    # tie of head and embeddings), same logits, same tokens as the plain bf16 model.
    model, tok = policy
    plain = copy.deepcopy(model).to(torch.bfloat16)
    fast = copy.deepcopy(plain)
    n_linear = sum(type(m) is nn.Linear for m in fast.modules())
    packed = pack_bf16_linears(fast)
    if not packed:  # no oneDNN bf16 matmul on this CPU: the model is left as it was
        assert sum(type(m) is nn.Linear for m in fast.modules()) == n_linear
        return
    assert len(packed) == n_linear and not any(type(m) is nn.Linear for m in fast.modules())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    if model.config.tie_word_embeddings:
        assert fast.get_output_embeddings().weight is fast.get_input_embeddings().weight
    ids, mask = encode_prompts(tok, PROMPTS)
    with torch.inference_mode():
        want = plain(input_ids=ids, attention_mask=mask).logits
        got = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    _, _, a = _sample(plain, tok, temperature=1.0)
    _, _, b = _sample(fast, tok, temperature=1.0)
    assert torch.equal(a.response_ids, b.response_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-2, rtol=0)
    _, _, c = _sample(copy.deepcopy(fast), tok, temperature=1.0)  # a copy repacks its weights
    assert torch.equal(c.response_ids, b.response_ids) and torch.equal(c.logprobs, b.logprobs)


def test_a_packed_linear_follows_its_weight_after_repack():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(4, 3, 16, dtype=torch.bfloat16)  # (B, T, H): the model's layout
    (layer,) = pack_bf16_linears(nn.Sequential(linear)) or pytest.skip("no oneDNN bf16 matmul")
    assert isinstance(layer, PackedLinear) and layer.weight is linear.weight
    torch.testing.assert_close(layer(x), nn.functional.linear(x, linear.weight, linear.bias))
    with torch.no_grad():
        layer.weight.mul_(-2.0)
    layer.repack()
    torch.testing.assert_close(layer(x), nn.functional.linear(x, linear.weight, linear.bias))
