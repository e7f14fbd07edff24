"""Policy loading: tiny Llama and GPT-2 through the same code path as SmolLM2 and gpt2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tiny
import torch

from upbeat.errors import ModelLoadError
from upbeat.models import (
    freeze_except_top_blocks,
    load_policy,
    native_bf16,
    position_ids_from_mask,
    resolve_bf16,
    save_policy,
    transformer_blocks,
)


@pytest.fixture(scope="module")
def gpt2_no_pad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 saved like the real one: no pad token, EOS is the only special token."""
    path = tiny.build_tiny_gpt2(tmp_path_factory.mktemp("gpt2-nopad"))
    tok_cfg = path / "tokenizer_config.json"
    import json

    cfg = json.loads(tok_cfg.read_text())
    cfg.pop("pad_token", None)
    tok_cfg.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_local_dir_loads_in_eval_mode_with_left_padding(fixture: str, request) -> None:
    model, tok = load_policy(str(request.getfixturevalue(fixture)))
    assert not model.training
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    batch = tok(["i love this", "so sad and tired of everything today"], padding=True)
    # The short row is padded on the left, so its last token is a real one.
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1


def test_dropout_is_off(tiny_gpt2: Path) -> None:
    model, _ = load_policy(str(tiny_gpt2))
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.0
    ids = torch.tensor([[5, 6, 7, 8]])
    model.train()  # even in train mode two passes agree: there is no dropout left
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_missing_pad_token_is_added_distinct_from_eos(gpt2_no_pad: Path) -> None:
    model, tok = load_policy(str(gpt2_no_pad))
    assert tok.pad_token_id not in (None, tok.eos_token_id)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # EOS at the end of a real text stays visible to attention.
    batch = tok(
        ["i love this" + tok.eos_token, "a much longer text than the other one"], padding=True
    )
    assert batch["attention_mask"][0][-1] == 1


def test_left_padded_logits_match_unpadded(tiny_llama: Path) -> None:
    """With position ids from the mask, padding a row does not change its last-token logits."""
    model, tok = load_policy(str(tiny_llama))
    short, long = "i love this", "this is the worst day ever, i hate it"
    alone = tok([short], return_tensors="pt")
    padded = tok([short, long], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**alone).logits[0, -1]
        got = model(**padded, position_ids=position_ids_from_mask(padded["attention_mask"])).logits[
            0, -1
        ]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_save_reload_round_trip(tiny_llama: Path, tmp_path: Path) -> None:
    model, tok = load_policy(str(tiny_llama))
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.5)  # differs from the files it came from
    out = save_policy(model, tok, tmp_path / "policy")
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    again, tok2 = load_policy(str(out))
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert tok2("i love this")["input_ids"] == tok("i love this")["input_ids"]
    assert tok2.padding_side == "left"


def test_save_overwrites_atomically(tiny_gpt2: Path, tmp_path: Path) -> None:
    model, tok = load_policy(str(tiny_gpt2))
    target = tmp_path / "policy"
    save_policy(model, tok, target)
    (target / "stale.txt").write_text("from an older save")
    save_policy(model, tok, target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_bad_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_policy(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_policy(str(tmp_path))  # exists but holds no weights


def test_pytorch_bin_only_is_refused(tiny_gpt2: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_gpt2, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_policy(str(tmp_path / "m"))


def test_offline_hub_id_says_what_to_do() -> None:
    # conftest sets HF_HUB_OFFLINE=1: the hub is unreachable by construction.
    with pytest.raises(ModelLoadError, match="hub is unreachable") as info:
        load_policy("gpt2-upbeat-test-nonexistent")
    assert "packaged:smollm2-135m" in str(info.value)


def test_unknown_packaged_model() -> None:
    with pytest.raises(ModelLoadError, match="packaged:smollm2-135m"):
        load_policy("packaged:nope")


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_freeze_except_top_blocks(fixture: str, request) -> None:
    model, _ = load_policy(str(request.getfixturevalue(fixture)))
    blocks = transformer_blocks(model)
    trainable = freeze_except_top_blocks(model, 1)
    ids = {id(p) for p in trainable}
    assert all(id(p) in ids for p in blocks[-1].parameters())
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert not model.get_input_embeddings().weight.requires_grad
    assert all(p.requires_grad for p in trainable)
    n_norm = sum(p.numel() for p in trainable) - sum(p.numel() for p in blocks[-1].parameters())
    assert n_norm == model.config.hidden_size * (
        1 if fixture == "tiny_llama" else 2
    )  # ln_f has a bias
    # Gradients reach only the trainable part.
    model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    assert all(p.grad is None for p in blocks[0].parameters())
    assert all(p.grad is not None for p in blocks[-1].parameters())
    # 0 trains everything; more blocks than the model has is an error.
    assert len(freeze_except_top_blocks(model, 0)) == len(list(model.parameters()))
    with pytest.raises(ModelLoadError, match="only 2 blocks"):
        freeze_except_top_blocks(model, 3)


def test_atomic_dir_leaves_nothing_when_writing_fails(tmp_path: Path) -> None:
    from upbeat.models import _atomic_dir

    with pytest.raises(RuntimeError), _atomic_dir(tmp_path / "cache") as tmp:
        (tmp / "half.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_env_var_moves_the_packaged_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from upbeat.models import cache_root

    monkeypatch.setenv("UPBEAT_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"


@pytest.mark.parametrize(
    ("caps", "native"),
    [
        ({"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),
        ({"avx2": True, "avx512_bf16": True, "amx_bf16": False}, True),  # e.g. Zen 4, Cooper Lake
        ({"avx512_bf16": False, "amx_bf16": True}, True),  # Sapphire Rapids and later
        ({"architecture": "x86_64", "num_physical_cores": 2}, False),  # nothing reported
    ],
)
def test_native_bf16_reads_the_cpu_capabilities(caps, native, monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert native_bf16() is native


@pytest.mark.parametrize("native", [False, True])
def test_resolve_bf16_auto_follows_the_cpu_and_explicit_true_is_warned(native, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": native})
    assert resolve_bf16("auto") is native
    assert resolve_bf16(False) is False
    if native:
        assert resolve_bf16(True) is True
    else:  # honoured, but the user is told it will be slow and which key to change
        with pytest.warns(RuntimeWarning, match=r"ppo\.bf16: true.*no native bf16"):
            assert resolve_bf16(True) is True
