"""PPO checkpoints that load without running code, and resume from the newest good one.

A checkpoint is a directory `step-000010/`:
- `trainable.safetensors`: the trained weights by name (top blocks, final norm, value head);
- `optimizer.safetensors`: the optimizer's per-parameter tensors, named `<param index>.<key>`
  (Adam: step, exp_avg, exp_avg_sq);
- `state.json`: step, fingerprint, the number of processes that trained it, β, the metric
  history so far, the optimizer's param groups (its hyper-parameters) and the sha256 of both
  tensor files.

Tensors are saved from the CPU (a GPU run's are copied there first) and carry no device: a
checkpoint written on a GPU resumes on a CPU and the other way round.

Nothing is pickled: safetensors and JSON parsers build tensors and plain values and run no code, so
a planted or tampered checkpoint can at worst fail to load. (`torch.load(weights_only=True)` would
also refuse code for the optimizer's dict, but it is still an unpickler guarded by an allow-list;
"no pickle in a checkpoint" is one rule to audit, for the cost of flattening Adam's state.)

Writes go to a temporary directory, each file fsynced and `state.json` last, which is then
renamed. Where rename is atomic a killed save leaves only a `.tmp-*` directory; where it is not,
or the disk filled up, a checkpoint can be truncated or damaged: the hashes in `state.json` catch
that, and `find_resumable` falls back to the older checkpoint (two are kept) or starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from upbeat.errors import UpbeatError

WEIGHTS, OPTIMIZER, STATE = "trainable.safetensors", "optimizer.safetensors", "state.json"
KEEP = 2  # the newest two: if the last write is damaged, the one before it resumes
_STATE_TYPES = {
    "step": int,
    "fingerprint": str,
    "kl_coef": float,
    "history": list,
    "param_groups": list,
    "sha256": dict,
}
_OPTIONAL = {"processes": 1}  # keys an older upbeat did not write, and what it meant


class CheckpointError(UpbeatError):
    """A checkpoint cannot be used: a file is missing, truncated or damaged."""


@dataclass
class Checkpoint:
    """A checkpoint read back whole: every file present and matching its hash."""

    path: Path
    step: int
    fingerprint: str
    processes: int  # how many processes trained it (each drew its own samples)
    kl_coef: float
    history: list[dict[str, float]]
    weights: dict[str, torch.Tensor]  # on the CPU
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


# --- writing ------------------------------------------------------------------------------------


def save_checkpoint(
    directory: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    fingerprint: str,
    kl_coef: float,
    history: list[dict[str, float]],
    processes: int = 1,
) -> Path:
    """Write checkpoint `step` (complete or not at all, where rename is atomic); keep the newest
    `KEEP`. Tensors are copied to the CPU first."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    tmp = directory / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    optimizer_tensors, param_groups = _flatten_optimizer(optimizer.state_dict())
    sha256 = {
        WEIGHTS: _write(tmp / WEIGHTS, save_tensors(_plain(weights))),
        OPTIMIZER: _write(tmp / OPTIMIZER, save_tensors(optimizer_tensors)),
    }
    state = {
        "step": step,
        "fingerprint": fingerprint,
        "processes": processes,
        "kl_coef": kl_coef,
        "history": history,
        "param_groups": param_groups,
        "sha256": sha256,
    }
    _write(tmp / STATE, json.dumps(state).encode())  # last: a checkpoint without it is incomplete
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _remove(path for _, path in _checkpoints(directory)[:-KEEP])
    return final


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors: what safetensors can serialise, on any device."""
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def _write(path: Path, data: bytes) -> str:
    """Write `data` to `path` and fsync it (so a rename after it never publishes an empty file on
    ext4 and kin); return its sha256 for `state.json`."""
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(data).hexdigest()


def _flatten_optimizer(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer state dict as named tensors (`<param index>.<key>`) plus its param groups."""
    tensors = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {index}.{key} is not a tensor: cannot store it")
            tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(
    tensors: dict[str, torch.Tensor], param_groups: list[dict[str, Any]]
) -> dict[str, Any]:
    """The inverse of `_flatten_optimizer`. JSON has no tuples: hyper-parameters that were tuples
    (Adam's betas) come back as lists and are turned back."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in param_groups
    ]
    return {"state": state, "param_groups": groups}


# --- reading ------------------------------------------------------------------------------------


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint with a `state.json` (not yet verified), or None."""
    done = [path for _, path in _checkpoints(directory) if (path / STATE).is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify a whole checkpoint; raises `CheckpointError` naming the bad file."""
    return _load(path, _read_state(path))


def find_resumable(directory: Path, fingerprint: str, processes: int = 1) -> Resumable:
    """The newest checkpoint of this run (same `fingerprint`, same number of `processes`) that
    reads back whole.

    Newer ones that are missing a file, truncated or damaged are passed over, each with a line
    saying why, and deleted (so that keeping the newest two never keeps them instead of a good
    one). When none is good, or the newest readable one is another run's, every checkpoint in
    `directory` is deleted and the run starts over; when it is this run's but was trained by
    another number of processes, a line says so (each process draws its own samples: the run
    could not continue as it started).
    """
    _remove(directory.glob(".tmp-step-*"))  # what a save killed before its rename leaves
    found = Resumable()
    passed_over = []
    for step, path in reversed(_checkpoints(directory)):
        try:
            state = _read_state(path)
            if state["fingerprint"] != fingerprint:
                break  # another run's (other params, inputs or precision): stale like the rest
            if (written_by := state["processes"]) != processes:
                found.skipped.append(
                    f"step {step} was trained by {written_by} process(es), this run has "
                    f"{processes}: a checkpoint resumes only with the `processes` it was "
                    "written with"
                )
                break
            found.checkpoint = _load(path, state)
        except CheckpointError as exc:
            found.skipped.append(f"step {step} was corrupt: {exc}")
            passed_over.append(path)
            continue
        _remove(passed_over)
        return found
    remove_checkpoints(directory)
    return found


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


def _read_state(path: Path) -> dict[str, Any]:
    """`state.json`, checked for the keys a checkpoint needs and their types."""
    file = path / STATE
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing (a write cut short, or a checkpoint from an older upbeat: its "
            "pickled state.pt is never loaded)"
        )
    try:
        state = json.loads(file.read_bytes())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{file} is truncated or damaged ({exc})") from None
    if not isinstance(state, dict):
        state = {}
    state = {**_OPTIONAL, **state}
    bad = [key for key, kind in _STATE_TYPES.items() if not isinstance(state.get(key), kind)]
    bad += [key for key, default in _OPTIONAL.items() if type(state[key]) is not type(default)]
    if bad:
        raise CheckpointError(f"{file} lacks a valid {', '.join(bad)}")
    return state


def _load(path: Path, state: dict[str, Any]) -> Checkpoint:
    """The tensors of checkpoint `path` (checked against `state`'s hashes) and its state."""
    optimizer = _read_tensors(path / OPTIMIZER, state["sha256"])
    return Checkpoint(
        path=path,
        step=state["step"],
        fingerprint=state["fingerprint"],
        processes=state["processes"],
        kl_coef=state["kl_coef"],
        history=state["history"],
        weights=_read_tensors(path / WEIGHTS, state["sha256"]),
        optimizer=_unflatten_optimizer(optimizer, state["param_groups"]),
    )


def _read_tensors(file: Path, sha256: dict[str, str]) -> dict[str, torch.Tensor]:
    """A safetensors file whose bytes hash to what `state.json` recorded at save time."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{file} cannot be read ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != sha256.get(file.name):
        raise CheckpointError(
            f"{file} is truncated or damaged ({len(data)} bytes; its sha256 differs from the "
            "one state.json recorded)"
        )
    return load_tensors(data)


# --- snapshots: the policy at chosen steps, kept for evaluate's over-optimisation curve ---------


def save_snapshot(directory: Path, step: int, weights: dict[str, torch.Tensor]) -> Path:
    """Write the policy's trained weights after `step` as `step-<step>.safetensors` (names as in
    the model's own state dict, so `load_snapshot` applies them onto the SFT model)."""
    from upbeat.files import replacing

    path = directory / f"step-{step:06d}.safetensors"
    with replacing(path) as tmp:
        _write(tmp, save_tensors(_plain(weights)))
    return path


def snapshots(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of each snapshot in `directory`, oldest first (none if it is absent)."""
    found = [
        (p.name.removeprefix("step-").removesuffix(".safetensors"), p)
        for p in directory.glob("step-*.safetensors")
    ]
    return sorted((int(step), path) for step, path in found if step.isdigit())


def prune_snapshots(directory: Path, after: int) -> None:
    """Delete the snapshots of steps after `after`: a resumed run redoes those steps (0: all)."""
    for step, path in snapshots(directory):
        if step > after:
            path.unlink()


def load_snapshot(path: Path) -> dict[str, torch.Tensor]:
    """A snapshot's tensors; a truncated file is a CheckpointError that names it."""
    try:
        return load_tensors(path.read_bytes())
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(
            f"{path} is truncated or damaged ({exc}); run `dvc repro ppo`"
        ) from None
