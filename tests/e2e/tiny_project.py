"""A temporary git + DVC copy of the project on the tiny profile, for the end-to-end tests.

Tiny models come from tests/tiny.py (a 2-block Llama saved into the copy), data is a few hundred
made-up tweets in Sentiment140 format, and every size parameter is cut down; the code paths are
the real ones (`dvc repro` of the real stages through the real flow).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import tiny

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

TINY_PARAMS = [
    "ingest.source=sentiment140",
    "ingest.sentiment140_path=inputs/tweets.csv",
    "validate.min_rows=50",
    "policy.base=tiny/llama",
    "policy.num_threads=1",
    "sft.max_train_examples=64",
    "sft.batch_size=8",
    "sft.max_length=24",
    "sft.warmup_steps=1",
    "sft.max_eval_examples=16",
    "sft.train_top_blocks=1",
    "reward.max_eval_examples=64",
    "reward.max_human_examples=64",
    "reward.learned.backbone=tiny/encoder",
    "ppo.steps=2",
    "ppo.batch_size=8",
    "ppo.minibatch_size=4",
    "ppo.ppo_epochs=1",
    "ppo.max_new_tokens=6",
    "ppo.prompt_max_tokens=4",
    "ppo.checkpoint_every=1",
    "ppo.snapshot_every=1",
    "ppo.train_top_blocks=1",
    "evaluate.n_prompts=16",
    "evaluate.max_new_tokens=6",
    "evaluate.batch_size=8",
    "evaluate.bootstrap_samples=100",
    "evaluate.n_samples_table=5",
    "evaluate.curve_prompts=8",
    "evaluate.best_of_n=2",
    # random tiny weights: the gate's bounds are opened so the first model can become champion
    "gate.min_judge_delta=-2.0",
    "gate.min_judge_share_delta=-1.0",
    "gate.max_kl=1000.0",
    "gate.min_distinct_2=0.0",
]


def project_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    return [f for f in out if f and (ROOT / f).is_file() and not f.startswith("tests/")]


def tweets_csv(path: Path, n: int, start: int = 0, targets: tuple[int, ...] = (0, 4)) -> None:
    """`n` Sentiment140 rows built from tiny.CORPUS (so the tiny tokenizer knows the words)."""
    rows = []
    for i in range(start, start + n):
        target = targets[i % len(targets)]
        text = f"{tiny.CORPUS[i % 10]} number {i} @friend http://t.co/{i}"
        rows.append(f'"{target}","{100000 + i}","Mon Apr 06 2009","NO_QUERY","user{i}","{text}"')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))


def git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def make_project(dest: Path, extra_params: list[str] = ()) -> Path:
    """Copy the project (code, dvc.yaml, params.yaml) to `dest` and set the tiny profile."""
    from upbeat.cli import apply_overrides

    for rel in project_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    tiny.build_tiny_llama(dest / "tiny" / "llama")
    tiny.build_tiny_encoder(dest / "tiny" / "encoder")
    tweets_csv(dest / "inputs" / "tweets.csv", 300)  # the drop folder ingest depends on
    apply_overrides(dest / "params.yaml", [*TINY_PARAMS, *extra_params])
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "tiny copy")
    return dest


def stage_env(project: Path) -> dict[str, str]:
    """Stages import the copy's `upbeat` (whose files DVC hashed), not the editable install's."""
    return {
        "PYTHONPATH": str(project),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
