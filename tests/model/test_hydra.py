"""The hydra (upbeat/ppo.py): one trunk for policy, reference and value; bf16 sampling copy."""

from __future__ import annotations

import pytest
import torch

from upbeat.generation import encode_prompts, sample
from upbeat.hydra import Hydra
from upbeat.models import load_policy

PROMPTS = ["i love", "this is the worst day ever, i", "so"]


def _rollout(hydra: Hydra, tok, bf16: bool, seed: int = 0):
    """Sample like the PPO loop does, then recompute the log-probs with the training forward."""
    ids, mask = encode_prompts(tok, PROMPTS)
    s = sample(
        hydra.sampling_model(), ids, mask, max_new_tokens=6, temperature=0.8, eos_token_id=None,
        pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed),
        capture_block=hydra.split,
    )  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        input_ids = torch.cat([ids, s.response_ids[:, :-1]], dim=1)
        attention_mask = torch.cat([mask, torch.ones_like(s.response_ids[:, :-1])], dim=1)
        with torch.no_grad():
            trained, _, _ = hydra(input_ids, attention_mask, s.trunk, s.response_ids, 0.8)
            reference, _, _ = hydra(
                input_ids, attention_mask, s.trunk, s.response_ids, 0.8, reference=True
            )
    return s, trained, reference


@pytest.mark.parametrize("bf16", [False, True])
def test_training_forward_agrees_with_the_sampler_and_follows_updates(tiny_llama, bf16):
    # PPO's ratio is only meaningful if the forward it trains is the distribution it sampled from,
    # including after an update: the bf16 sampler must use the live trained blocks, not a copy.
    model, tok = load_policy(str(tiny_llama))
    hydra = Hydra(model, n_top=1, bf16=bf16)
    tol = dict(atol=0.05, rtol=0) if bf16 else dict(atol=1e-4, rtol=1e-4)
    s, trained, reference = _rollout(hydra, tok, bf16)
    torch.testing.assert_close(trained, s.logprobs, **tol)
    torch.testing.assert_close(reference, trained, atol=0, rtol=0)  # before any update: identical

    with torch.no_grad():  # an "update" of the trained top block and final norm
        for p in hydra.trainable:
            p.add_(torch.randn_like(p) * 0.5)
    s2, trained2, reference2 = _rollout(hydra, tok, bf16)
    torch.testing.assert_close(trained2, s2.logprobs, **tol)
    assert (trained2 - reference2).abs().max() > 0.1  # the reference stayed where it was
    assert all(p.dtype == torch.float32 for p in model.parameters())  # trained and saved in fp32
