"""PPO checkpoints: save, find the one to resume from, load.

A checkpoint is a directory `step-000010/`: the trained weights (top blocks, final norm, value
head) as safetensors, and `state.pt` (optimizer, β, step, metric history, fingerprint). It is
written under a temporary name and renamed, so a SIGKILL never leaves a half checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS, STATE = "trainable.safetensors", "state.pt"
KEEP = 2  # older checkpoints are deleted


@dataclass
class Checkpoint:
    """A checkpoint read back."""

    step: int
    fingerprint: str
    kl_coef: float
    history: list[dict[str, float]]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # a state dict for `torch.optim.Optimizer.load_state_dict`


@dataclass
class Resumable:
    """What `find_resumable` found: the checkpoint to resume from (None: start over), and why
    each newer one was passed over."""

    checkpoint: Checkpoint | None = None
    skipped: list[str] = field(default_factory=list)


def fingerprint(*parts: str) -> str:
    """A short hash of what identifies a run; a checkpoint only resumes a run with the same one."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def content_hash(*paths: str | Path) -> str:
    """Content hash of the inputs a checkpoint depends on (SFT weights, reward spec): a resumed
    run must continue the same problem."""
    h = hashlib.sha256()
    for root in map(Path, paths):
        for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if f.is_file():
                h.update(f.name.encode())
                with f.open("rb") as fh:
                    while chunk := fh.read(1 << 22):
                        h.update(chunk)
    return h.hexdigest()[:16]


def save_checkpoint(
    directory: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    fingerprint: str,
    kl_coef: float,
    history: list[dict[str, float]],
) -> Path:
    """Write checkpoint `step` atomically and keep the newest `KEEP`."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    tmp = directory / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "optimizer": optimizer.state_dict(),
        "kl_coef": kl_coef,
        "history": history,
    }
    torch.save(state, tmp / STATE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _remove(path for _, path in _checkpoints(directory)[:-KEEP])
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories are ignored), or None."""
    done = [path for _, path in _checkpoints(directory) if (path / STATE).is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint back."""
    state = torch.load(path / STATE, weights_only=False)  # our own file, written above
    return Checkpoint(
        step=int(state["step"]),
        fingerprint=str(state["fingerprint"]),
        kl_coef=float(state["kl_coef"]),
        history=list(state["history"]),
        weights=load_file(path / WEIGHTS),
        optimizer=state["optimizer"],
    )


def find_resumable(directory: Path, fingerprint: str) -> Resumable:
    """The latest checkpoint if this run (same `fingerprint`) wrote it; otherwise every
    checkpoint in `directory` is stale and deleted, and the run starts over."""
    latest = latest_checkpoint(directory)
    if latest is not None:
        checkpoint = load_checkpoint(latest)
        if checkpoint.fingerprint == fingerprint:
            return Resumable(checkpoint)
    remove_checkpoints(directory)
    return Resumable()


def remove_checkpoints(directory: Path) -> None:
    """Delete every checkpoint (and half-written one) in `directory`."""
    _remove([*directory.glob("step-*"), *directory.glob(".tmp-step-*")])


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of each `step-<digits>` directory, oldest first."""
    found = [(p.name.removeprefix("step-"), p) for p in directory.glob("step-*") if p.is_dir()]
    return sorted((int(step), path) for step, path in found if step.isdigit())


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
