"""A PPO run SIGKILLed after a checkpoint and re-run ends exactly like an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch

import upbeat.models
from upbeat.checkpoints import latest_checkpoint, snapshots
from upbeat.config import load_params
from upbeat.models import load_policy
from upbeat.overoptimisation import snapshot_policy
from upbeat.ppo import train

ROOT = Path(__file__).resolve().parents[2]
UPDATE = dict(
    steps=5,
    batch_size=8,
    minibatch_size=4,
    ppo_epochs=2,
    learning_rate=1e-3,
    max_new_tokens=6,
    train_top_blocks=1,
    checkpoint_every=2,
    snapshot_every=1,
    seed=7,
)
# Runs PPO in a child process that SIGKILLs itself right after step 3 (checkpoint: step 2).
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    import tiny
    from upbeat.config import load_params
    from upbeat.models import load_policy
    from upbeat.ppo import train
    torch.set_num_threads(1)
    model, tok = load_policy({model!r})
    cfg = load_params({params!r}).ppo.model_copy(update={update!r})
    def score(texts):
        return np.array([t.count("a") for t in texts], dtype=float)
    def on_step(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    train(model, tok, score, tiny.CORPUS, cfg, checkpoint_dir={ckpt!r}, on_step=on_step,
          snapshot_dir={snap!r})
    """
)


def score(texts):
    return np.array([t.count("a") for t in texts], dtype=float)


def _run(model_dir: Path, ckpt: Path | None, snap: Path | None = None, **changes):
    model, tok = load_policy(str(model_dir))
    cfg = load_params(ROOT / "params.yaml").ppo.model_copy(update={**UPDATE, **changes})
    result = train(model, tok, score, tiny.CORPUS, cfg, checkpoint_dir=ckpt, snapshot_dir=snap)
    return result, model


def _deterministic(history):
    return [{k: v for k, v in h.items() if not k.startswith(("time/", "perf/"))} for h in history]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the child uses 1 thread too: same reduction order, same bits
    yield
    torch.set_num_threads(before)


def test_sigkilled_run_resumes_to_the_same_end(tiny_llama, tmp_path, one_thread):
    ckpt, snap = tmp_path / "ckpt", tmp_path / "snapshots"
    code = CHILD.format(
        tests=str(ROOT / "tests"),
        model=str(tiny_llama),
        params=str(ROOT / "params.yaml"),
        update=UPDATE,
        ckpt=str(ckpt),
        snap=str(snap),
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert latest_checkpoint(ckpt).name == "step-000002"
    assert [step for step, _ in snapshots(snap)] == [1, 2]  # killed before step 3's was kept
    (snap / "step-000009.safetensors").write_bytes(b"from a run that went further")

    resumed, resumed_model = _run(tiny_llama, ckpt, snap)
    straight, straight_model = _run(tiny_llama, None)

    assert resumed.resumed_from == 2
    assert len(resumed.history) == len(straight.history) == UPDATE["steps"]
    assert _deterministic(resumed.history) == _deterministic(straight.history)
    for (name, a), b in zip(
        resumed_model.named_parameters(), straight_model.parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    assert latest_checkpoint(ckpt).name == "step-000005"  # the last step is always saved
    # Every step kept once (those before the kill too), none beyond the resume point left over;
    # the last snapshot put onto the untrained model is the trained policy.
    kept = dict(snapshots(snap))
    assert sorted(kept) == [1, 2, 3, 4, 5]
    last, _ = snapshot_policy(tiny_llama, kept[5], "cpu")
    for (name, a), b in zip(last.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_half_written_checkpoint_is_ignored(tiny_llama, tmp_path, one_thread):
    ckpt = tmp_path / "ckpt"
    (ckpt / ".tmp-step-000004-123").mkdir(parents=True)  # what a kill mid-save leaves behind
    (ckpt / "step-000004").mkdir()  # no state.json: incomplete, must not be resumed from
    result, _ = _run(tiny_llama, ckpt)
    assert result.resumed_from == 0
    assert os.path.isfile(latest_checkpoint(ckpt) / "trainable.safetensors")


def test_checkpoint_of_other_params_is_not_resumed(tiny_llama, tmp_path, one_thread):
    ckpt = tmp_path / "ckpt"
    _run(tiny_llama, ckpt, steps=2)
    same, _ = _run(tiny_llama, ckpt, steps=2)
    assert same.resumed_from == 2  # finished run, same params: nothing left to do
    other, _ = _run(tiny_llama, ckpt, steps=2, seed=8)
    assert other.resumed_from == 0  # stale checkpoints from other params are dropped
    assert [p.name for p in sorted(ckpt.iterdir())] == ["step-000002"]


def test_checkpoint_of_the_other_precision_is_not_resumed(
    tiny_llama, tmp_path, one_thread, monkeypatch
):
    # `bf16: auto` resolves per machine: a checkpoint written in bf16 must not resume in fp32.
    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(upbeat.models, "native_bf16", lambda: True)
    first, _ = _run(tiny_llama, ckpt, steps=2, bf16="auto")
    assert first.history[-1]["perf/bf16"] == 1.0
    monkeypatch.setattr(upbeat.models, "native_bf16", lambda: False)
    other, _ = _run(tiny_llama, ckpt, steps=2, bf16="auto")
    assert other.resumed_from == 0 and other.history[-1]["perf/bf16"] == 0.0


class Stop(Exception):
    """Stands for a run stopped after step 5 was logged, before it was checkpointed."""


def _stopped_run(model_dir: Path, ckpt: Path) -> None:
    """A run of UPDATE stopped in step 5: leaves checkpoints at steps 2 and 4."""

    def stop_at_5(step, metrics):
        if step == 5:
            raise Stop

    model, tok = load_policy(str(model_dir))
    cfg = load_params(ROOT / "params.yaml").ppo.model_copy(update=UPDATE)
    with pytest.raises(Stop):
        train(model, tok, score, tiny.CORPUS, cfg, checkpoint_dir=ckpt, on_step=stop_at_5)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000002", "step-000004"]


def test_truncated_newest_checkpoint_resumes_from_the_older_one(tiny_llama, tmp_path, one_thread):
    ckpt = tmp_path / "ckpt"
    _stopped_run(tiny_llama, ckpt)
    weights = ckpt / "step-000004" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # killed mid-write without atomic rename

    resumed, resumed_model = _run(tiny_llama, ckpt)
    straight, straight_model = _run(tiny_llama, None)

    assert resumed.resumed_from == 2
    assert len(resumed.skipped_checkpoints) == 1
    assert resumed.skipped_checkpoints[0].startswith("step 4 was corrupt:")
    assert "trainable.safetensors is truncated or damaged" in resumed.skipped_checkpoints[0]
    assert _deterministic(resumed.history) == _deterministic(straight.history)
    for (name, a), b in zip(
        resumed_model.named_parameters(), straight_model.parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_all_checkpoints_corrupt_starts_over_and_says_so(tiny_llama, tmp_path, one_thread):
    ckpt = tmp_path / "ckpt"
    _stopped_run(tiny_llama, ckpt)
    (ckpt / "step-000004" / "optimizer.safetensors").write_bytes(b"")  # a full disk
    (ckpt / "step-000002" / "state.json").write_text('{"step": 2, "fingerpr')

    again, _ = _run(tiny_llama, ckpt)
    straight, _ = _run(tiny_llama, None)

    assert again.resumed_from == 0
    assert [s.split(":")[0] for s in again.skipped_checkpoints] == [
        "step 4 was corrupt",
        "step 2 was corrupt",
    ]
    assert "optimizer.safetensors is truncated or damaged" in again.skipped_checkpoints[0]
    assert "state.json is truncated or damaged" in again.skipped_checkpoints[1]
    assert _deterministic(again.history) == _deterministic(straight.history)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000004", "step-000005"]
