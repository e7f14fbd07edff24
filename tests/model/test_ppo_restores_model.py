"""train() hands the caller's model back as it found it, also when a run raises (upbeat/ppo.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny

from upbeat.config import load_params
from upbeat.errors import TrainingError
from upbeat.models import load_policy
from upbeat.ppo import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.filterwarnings("ignore:ppo.bf16. true:RuntimeWarning")  # emulated bf16: still tiny
def test_a_raising_scorer_leaves_the_attention_as_it_was(tiny_llama):
    model, tok = load_policy(str(tiny_llama))
    before = model.config._attn_implementation
    seen = []

    def scorer(texts):  # fine for step 1, then fails like a reward model gone wrong
        seen.append(model.config._attn_implementation)
        if len(seen) == 2:
            raise TrainingError("the reward model fell over")
        return np.zeros(len(texts))

    cfg = load_params(ROOT / "params.yaml").ppo.model_copy(
        update=dict(steps=3, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=4,
                    train_top_blocks=1, bf16=True)
    )  # fmt: skip
    with pytest.raises(TrainingError, match="fell over"):
        train(model, tok, scorer, tiny.CORPUS, cfg)
    assert seen == ["eager", "eager"] and before != "eager"  # bf16 training did switch it
    assert model.config._attn_implementation == before
