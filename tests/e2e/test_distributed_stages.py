"""The sft and ppo stage scripts with `processes: 2`, as DVC runs them: each launches itself under
torchrun (2 CPU processes, gloo), the main process alone writes the outputs and the MLflow run,
and a SIGTERM to the stage (what a flow run's cancel sends) stops torchrun and both processes;
the next run resumes from the last checkpoint with the same 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import psutil
import pytest
import tiny
import yaml
from waiting import wait_until

from upbeat.config import load_params
from upbeat.data.sources import save_canonical
from upbeat.rewards import build_spec, save_spec

ROOT = Path(__file__).resolve().parents[2]
PPO_STEPS = 24  # long enough to be stopped between its first checkpoint and its end
TIMEOUT = 180  # seconds per stage run


def canonical(texts: list[str]) -> pd.DataFrame:
    n = len(texts)
    return pd.DataFrame(
        {
            "target": [0] * n,
            "id": range(1000, 1000 + n),
            "date": ["Mon Apr 06 2009"] * n,
            "flag": ["NO_QUERY"] * n,
            "user": [f"u{i}" for i in range(n)],
            "text": texts,
        }
    )


def command(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "stages" / f"{name}.py"), *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "UPBEAT_PROGRESS_SECONDS": "0"}


PPO_ARGS = [
    "--sft", "sft", "--reward-spec", "reward_spec.json", "--train", "train.parquet",
    "--out", "models/ppo", "--checkpoints", "checkpoints/ppo", "--snapshots", "models/snapshots",
    "--metrics", "reports/ppo.json", "--curve", "reports/ppo_curve.csv",
]  # fmt: skip


@pytest.fixture
def project(tmp_path: Path, tiny_llama: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["policy"].update(base=str(tiny_llama), num_threads=1, device="cpu")
    params["sft"].update(
        max_train_examples=32, max_eval_examples=8, batch_size=8, warmup_steps=1,
        train_top_blocks=1, processes=2,
    )  # fmt: skip
    params["ppo"].update(
        steps=PPO_STEPS, batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=6,
        prompt_max_tokens=4, checkpoint_every=2, train_top_blocks=1, processes=2,
    )  # fmt: skip
    params["reward"]["kind"] = "vader"  # the stage's mechanics; a learned reward: test_flow.py
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    texts = [f"{t} number {i}" for i, t in enumerate(tiny.CORPUS)]
    save_canonical(canonical(texts[:40]), tmp_path / "train.parquet")
    save_canonical(canonical(texts[40:]), tmp_path / "eval.parquet")
    (tmp_path / "sft").symlink_to(tiny_llama)
    spec = build_spec(load_params(tmp_path / "params.yaml").reward)
    save_spec(spec, tmp_path / "reward_spec.json")
    return tmp_path


def stage_runs(name: str) -> int:
    """MLflow runs the stage recorded (in the throwaway store the tests point MLflow at)."""
    from mlflow import MlflowClient

    from upbeat.tracking import tracking_uri

    # A client on this test's store: an earlier test's `mlflow.set_tracking_uri` may still stand.
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("upbeat")
    if exp is None:
        return 0
    return len(client.search_runs([exp.experiment_id], f"tags.`upbeat.stage` = '{name}'"))


def test_sft_stage_on_two_processes_writes_once(project: Path) -> None:
    args = ["--train", "train.parquet", "--eval", "eval.parquet", "--out", "models/sft"]
    args += ["--metrics", "reports/sft.json", "--curve", "reports/sft_curve.csv"]
    proc = subprocess.run(
        command("sft", *args), cwd=project, env=env(), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((project / "reports/sft.json").read_text())
    assert metrics["sft/steps"] == 4  # 32 tweets in global batches of 8, 4 each per process
    assert (project / "models/sft/model.safetensors").is_file()
    assert pd.read_csv(project / "reports/sft_curve.csv")["step"].tolist() == [1, 2, 3, 4]
    assert proc.stdout.count("sft: eval perplexity") == 1  # the main process reports, alone
    assert stage_runs("sft") == 1


def test_ppo_stage_on_two_processes_stops_on_sigterm_and_resumes(project: Path) -> None:
    first = subprocess.Popen(
        command("ppo", *PPO_ARGS), cwd=project, env=env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    launched = psutil.Process(first.pid)
    checkpoint = project / "checkpoints/ppo/step-000002/state.json"
    wait_until(
        "checkpoint",
        checkpoint.is_file,
        TIMEOUT,
        0.05,
        alive=first,
        output=lambda: first.stdout.read() if first.poll() is not None else "",
    )
    started = launched.children(recursive=True)  # torchrun and its 2 processes
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=TIMEOUT)[0]
    assert first.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert len(started) >= 3
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"left running after SIGTERM: {alive}"
    done = sorted(p.name for p in (project / "checkpoints/ppo").iterdir())
    stopped_at = int(done[-1].removeprefix("step-"))
    assert 2 <= stopped_at < PPO_STEPS, done  # stopped between the first checkpoint and the end

    again = subprocess.run(
        command("ppo", *PPO_ARGS), cwd=project, env=env(), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from checkpoint at step {stopped_at}" in again.stdout + again.stderr
    curve = pd.read_csv(project / "reports/ppo_curve.csv")
    assert curve["step"].tolist() == list(range(1, PPO_STEPS + 1))
    assert json.loads((project / "reports/ppo.json").read_text())["ppo/steps"] == PPO_STEPS
    assert (project / "models/ppo/model.safetensors").is_file()
