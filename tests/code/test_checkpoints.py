"""Checkpoint files (upbeat/checkpoints.py): exact round trip, no pickle, fallback past damage."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from upbeat.checkpoints import (
    OPTIMIZER,
    STATE,
    WEIGHTS,
    CheckpointError,
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

RUN = "run-a"


def _model_and_adam(seed: int = 0) -> tuple[nn.Linear, torch.optim.Adam]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-5, fused=True)


def _train_step(model: nn.Linear, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()


def _save(directory: Path, step: int, model: nn.Linear, optimizer: torch.optim.Optimizer) -> Path:
    history = [{"objective/score": float(s), "loss/value": math.nan} for s in range(step)]
    return save_checkpoint(
        directory,
        step,
        dict(model.named_parameters()),
        optimizer,
        fingerprint=RUN,
        kl_coef=0.1 * step,
        history=history,
    )


def _two_checkpoints(directory: Path) -> None:
    model, adam = _model_and_adam()
    for step in (1, 2, 3, 4):
        _train_step(model, adam, step)
        if step % 2 == 0:
            _save(directory, step, model, adam)


def test_round_trip_continues_training_exactly(tmp_path):
    model, adam = _model_and_adam()
    for step in range(3):
        _train_step(model, adam, step)
    path = _save(tmp_path, 3, model, adam)

    ckpt = load_checkpoint(path)
    assert (ckpt.step, ckpt.fingerprint, ckpt.kl_coef) == (3, RUN, pytest.approx(0.3))
    assert ckpt.history[2]["objective/score"] == 2.0 and math.isnan(ckpt.history[0]["loss/value"])
    assert ckpt.optimizer["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple again

    # A fresh model and optimizer loaded from the checkpoint take the same next step as the
    # originals: weights, Adam's moments and its step count all came back.
    other, other_adam = _model_and_adam(seed=1)
    with torch.no_grad():
        for name, p in other.named_parameters():
            p.copy_(ckpt.weights[name])
    other_adam.load_state_dict(ckpt.optimizer)
    _train_step(model, adam, 99)
    _train_step(other, other_adam, 99)
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_only_the_newest_two_are_kept(tmp_path):
    model, adam = _model_and_adam()
    for step in (2, 4, 6):
        _train_step(model, adam, step)
        _save(tmp_path, step, model, adam)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000006"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000006"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 5] ^= 0xFF  # inside the last tensor's data: the header still parses
    path.write_bytes(bytes(data))


def _zero_length(path: Path) -> None:
    path.write_bytes(b"")


# Each kind of damage a kill or a full disk can leave, on each file; `needle` is in the message.
DAMAGE: list[tuple[str, Callable[[Path], None], str]] = [
    (WEIGHTS, _truncate, "trainable.safetensors is truncated or damaged"),
    (WEIGHTS, _flip_a_byte, "trainable.safetensors is truncated or damaged"),
    (OPTIMIZER, _zero_length, "optimizer.safetensors is truncated or damaged"),
    (OPTIMIZER, Path.unlink, "optimizer.safetensors cannot be read"),
    (STATE, _truncate, "state.json is truncated or damaged"),
    (STATE, Path.unlink, "state.json is missing"),
]


@pytest.mark.parametrize(("name", "damage", "needle"), DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, name, damage, needle):
    _two_checkpoints(tmp_path)
    damage(tmp_path / "step-000004" / name)
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(tmp_path / "step-000004")

    found = find_resumable(tmp_path, RUN)
    assert found.checkpoint is not None and found.checkpoint.step == 2
    assert len(found.skipped) == 1
    assert found.skipped[0].startswith("step 4 was corrupt:") and needle in found.skipped[0]
    # The damaged one is gone, so the next save's pruning cannot keep it over a good one.
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]


def test_all_damaged_starts_over_and_says_why(tmp_path):
    _two_checkpoints(tmp_path)
    _truncate(tmp_path / "step-000004" / WEIGHTS)
    (tmp_path / "step-000002" / STATE).write_text(json.dumps({"step": 2}))
    found = find_resumable(tmp_path, RUN)
    assert found.checkpoint is None
    assert [s.split(":")[0] for s in found.skipped] == ["step 4 was corrupt", "step 2 was corrupt"]
    assert "lacks a valid fingerprint, kl_coef" in found.skipped[1]
    assert list(tmp_path.iterdir()) == []


def test_another_runs_checkpoints_are_removed_silently(tmp_path):
    _two_checkpoints(tmp_path)
    (tmp_path / ".tmp-step-000006-123").mkdir()  # a save killed before its rename
    found = find_resumable(tmp_path, "run-b")
    assert found.checkpoint is None and found.skipped == []
    assert list(tmp_path.iterdir()) == []


def test_a_good_checkpoint_resumes_and_its_leftovers_go(tmp_path):
    _two_checkpoints(tmp_path)
    (tmp_path / ".tmp-step-000006-123").mkdir()
    found = find_resumable(tmp_path, RUN)
    assert found.checkpoint is not None and found.checkpoint.step == 4 and found.skipped == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000004"]


class _RunsCode:
    """Unpickling this creates `marker`: stands for any code a planted pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def _plant_pickle(path: Path, marker: Path, spare: Path) -> None:
    """A pickle that runs code when loaded, plus a spare copy to prove that it does."""
    torch.save({"step": 4, "fingerprint": RUN, "optimizer": _RunsCode(marker)}, path)
    shutil.copy(path, spare)


def test_a_pickled_checkpoint_is_refused_without_running_it(tmp_path):
    ckpt, marker, spare = tmp_path / "ckpt", tmp_path / "ran", tmp_path / "spare.pt"
    (ckpt / "step-000004").mkdir(parents=True)
    _plant_pickle(ckpt / "step-000004" / "state.pt", marker, spare)  # an older upbeat's layout

    found = find_resumable(ckpt, RUN)

    assert found.checkpoint is None  # starts over, and says why
    assert found.skipped[0].startswith("step 4 was corrupt:")
    assert "state.json is missing" in found.skipped[0]
    assert "pickled state.pt is never loaded" in found.skipped[0]
    assert not marker.exists()
    torch.load(spare, weights_only=False)  # the plant was live: loading it does run code
    assert marker.exists()


def test_pickles_beside_a_good_checkpoint_are_never_opened(tmp_path):
    ckpt, marker, spare = tmp_path / "ckpt", tmp_path / "ran", tmp_path / "spare.pt"
    _two_checkpoints(ckpt)
    for name in ("state.pt", "optimizer.pt", "trainable.pt"):
        _plant_pickle(ckpt / "step-000004" / name, marker, spare)
    found = find_resumable(ckpt, RUN)
    assert found.checkpoint is not None and found.checkpoint.step == 4
    assert not marker.exists()
