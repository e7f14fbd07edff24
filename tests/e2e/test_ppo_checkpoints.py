"""The ppo stage past bad checkpoints: it says which it skipped, and never unpickles one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import test_ppo_stage
import torch

project = test_ppo_stage.project  # the same tiny project fixture as the stage's own test
run_stage = test_ppo_stage.run_stage
CKPT = Path("checkpoints/ppo")


def _curve(project: Path) -> pd.DataFrame:
    curve = pd.read_csv(project / "reports/ppo_curve.csv")
    return curve.drop(columns=[c for c in curve.columns if c.startswith(("time/", "perf/"))])


def test_stage_resumes_past_a_truncated_checkpoint_and_says_so(project: Path) -> None:
    first = run_stage(project)
    assert first.returncode == 0, first.stderr
    straight = _curve(project)
    weights = project / CKPT / "step-000003" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])

    again = run_stage(project)

    assert again.returncode == 0, again.stderr
    out = again.stdout + again.stderr
    assert "resumed from checkpoint at step 2 (step 3 was corrupt: " in out
    assert "step-000003/trainable.safetensors is truncated or damaged" in out
    pd.testing.assert_frame_equal(_curve(project), straight)  # step 3 redone, same numbers


class _RunsCode:
    """Unpickling this creates `marker`: stands for any code a planted pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_stage_never_unpickles_a_planted_checkpoint(project: Path, tmp_path: Path) -> None:
    marker, spare = tmp_path / "ran", tmp_path / "spare.pt"
    planted = project / CKPT / "step-000002" / "state.pt"  # where an older upbeat kept its state
    planted.parent.mkdir(parents=True)
    torch.save({"step": 2, "fingerprint": "", "optimizer": _RunsCode(marker)}, planted)
    shutil.copy(planted, spare)

    proc = run_stage(project)

    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "no usable checkpoint, started over (step 2 was corrupt: " in out
    assert "pickled state.pt is never loaded" in out
    assert not marker.exists()
    assert pd.read_csv(project / "reports/ppo_curve.csv")["step"].tolist() == [1, 2, 3]
    torch.load(spare, weights_only=False)  # the plant was live: loading it does run code
    assert marker.exists()
