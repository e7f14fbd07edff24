"""SFT behaviour on a tiny model: it learns the tweets, saves, reloads, generates, reproduces."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny
import torch

from upbeat.config import load_params
from upbeat.errors import DataError
from upbeat.models import load_policy, save_policy
from upbeat.sft import collate, eval_perplexity, tokenize, total_steps, train

ROOT = Path(__file__).resolve().parents[2]
TRAIN = tiny.CORPUS[:40]
EVAL = tiny.CORPUS[40:]  # the corpus repeats: eval tweets are seen in training, so loss must drop


def sft_params(**changes):
    base = {
        "epochs": 4,
        "learning_rate": 3e-3,
        "batch_size": 8,
        "max_length": 24,
        "warmup_steps": 2,
        "train_top_blocks": 0,
        "max_train_examples": 1000,
        "max_eval_examples": 1000,
        "seed": 7,
    }
    base.update(changes)
    return load_params(ROOT / "params.yaml", {f"sft.{k}": v for k, v in base.items()}).sft


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_sft_lowers_eval_loss_and_the_saved_model_generates(fixture, request, tmp_path) -> None:
    model, tok = load_policy(str(request.getfixturevalue(fixture)))
    steps: list[tuple[int, dict]] = []
    params = sft_params()
    result = train(
        model, tok, TRAIN, EVAL, params, on_step=lambda step, m: steps.append((step, dict(m)))
    )
    m = result.metrics
    assert m["sft/eval_ppl_after"] < 0.5 * m["sft/eval_ppl_before"]
    assert len(result.curve) == m["sft/steps"] == 4 * 5  # 40 tweets / 8 per batch, 4 epochs
    assert total_steps(len(TRAIN), params) == 20
    assert total_steps(1000, sft_params(max_train_examples=12, epochs=3)) == 3 * 2  # capped
    # one call per optimizer step in order, after step 0 (the eval before training)
    assert [step for step, _ in steps] == list(range(21))
    assert [step for step, metrics in steps if "sft/eval_ppl" in metrics] == [0, 5, 10, 15, 20]
    assert all({"sft/loss", "sft/lr"} <= set(metrics) for _, metrics in steps[1:])
    assert steps[-1][1]["sft/eval_ppl"] == m["sft/eval_ppl_after"]
    assert not model.training

    out = save_policy(model, tok, tmp_path / "sft")
    again, tok2 = load_policy(str(out))
    seqs = tokenize(EVAL, tok2, 24)
    bf16 = m["sft/bf16"] == 1.0  # `sft.bf16: auto` evaluates in bf16 where training did
    assert eval_perplexity(again, seqs, tok2.pad_token_id, 8, bf16=bf16) == pytest.approx(
        m["sft/eval_ppl_after"], rel=1e-5
    )
    prompts = tok2(["i love", "so sad and tired of"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    generated = again.generate(**prompts, max_new_tokens=6, do_sample=True)
    assert generated.shape[0] == 2 and generated.shape[1] > prompts["input_ids"].shape[1]
    assert (generated[:, prompts["input_ids"].shape[1] :] != tok2.pad_token_id).any()


def test_same_seed_same_weights_and_other_seed_differs(tiny_llama: Path) -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        model, tok = load_policy(str(tiny_llama))
        train(model, tok, TRAIN, EVAL, sft_params(epochs=1, seed=seed))
        return model.state_dict()

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_top_blocks_only_changes_the_top(tiny_llama: Path) -> None:
    model, tok = load_policy(str(tiny_llama))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, tok, TRAIN, EVAL, sft_params(epochs=1, train_top_blocks=1))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed)


def test_examples_end_with_eos_and_padding_is_not_a_target(tiny_llama: Path) -> None:
    _, tok = load_policy(str(tiny_llama))
    seqs = tokenize(["i love this so much, what a great day", "bad"], tok, max_length=5)
    assert all(s[-1] == tok.eos_token_id and len(s) <= 5 for s in seqs)
    batch = collate(seqs, tok.pad_token_id)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    # The short row's first token follows padding: nothing real predicts it, so it is no target.
    assert batch["labels"][1, -len(seqs[1])] == -100 and batch["labels"][1, -1] != -100
    assert (batch["labels"][:, -1] == tok.eos_token_id).all()  # EOS is learned, not masked
    assert batch["position_ids"][1, -len(seqs[1])] == 0  # left-padded row starts at position 0


def test_empty_split_is_a_data_error(tiny_llama: Path) -> None:
    model, tok = load_policy(str(tiny_llama))
    with pytest.raises(DataError, match="train split is empty"):
        train(model, tok, [], EVAL, sft_params())


def test_eval_perplexity_does_not_depend_on_the_attention_kernel(tiny_llama: Path) -> None:
    # A left-padded row's first token follows padding, whose output eager and SDPA attention
    # fill differently (a row with no key to attend to): it must not be a target.
    model, tok = load_policy(str(tiny_llama))
    train(model, tok, TRAIN, EVAL, sft_params(epochs=1, bf16=False))
    seqs = tokenize(EVAL, tok, 24)
    ppl = {}
    for attention in ("sdpa", "eager"):
        model.set_attn_implementation(attention)
        ppl[attention] = eval_perplexity(model, seqs, tok.pad_token_id, 8)
    assert ppl["eager"] == pytest.approx(ppl["sdpa"], rel=1e-5)
