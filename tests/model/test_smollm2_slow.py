"""The real default policy (SmolLM2-135M from the packaged GGUF). Opt-in: `make test-slow`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import upbeat.models as models
from upbeat.models import load_policy, transformer_blocks

pytestmark = pytest.mark.slow


def test_packaged_smollm2_dequantizes_once_then_loads_from_cache(tmp_path: Path, monkeypatch):
    started = time.perf_counter()
    model, tok = load_policy("packaged:smollm2-135m", cache_dir=tmp_path)
    first = time.perf_counter() - started
    cached = tmp_path / "models" / "smollm2-135m"
    assert (cached / "model.safetensors").is_file() and (cached / models.SOURCE_FILE).is_file()
    assert [p.name for p in cached.parent.iterdir()] == ["smollm2-135m"]  # no temp dirs left
    # SmolLM2-135M: 30 Llama blocks, 576 wide, ~134.5M parameters (+ one pad embedding row).
    assert len(transformer_blocks(model)) == 30
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"

    def no_dequantize(*_args):
        raise AssertionError("the second load must come from the cache, not the GGUF")

    monkeypatch.setattr(models, "_dequantize_gguf", no_dequantize)
    started = time.perf_counter()
    again, _ = load_policy("packaged:smollm2-135m", cache_dir=tmp_path)
    second = time.perf_counter() - started
    print(f"\nfirst load {first:.1f} s (dequantize + cache), second {second:.1f} s")
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, again.state_dict()[name]), name

    prompts = tok(["The weather today is", "I love"], return_tensors="pt", padding=True)
    out = again.generate(**prompts, max_new_tokens=12, do_sample=False)
    texts = tok.batch_decode(out[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True)
    print(texts)
    # A real pretrained LM continues with words (greedy: "I love" -> " the idea of a community
    # garden, ..."), and never starts a continuation with padding or an immediate EOS.
    assert sum(c.isalpha() for t in texts for c in t) >= 20
    first = out[:, prompts["input_ids"].shape[1]]
    assert not torch.isin(first, torch.tensor([tok.pad_token_id, tok.eos_token_id])).any()
