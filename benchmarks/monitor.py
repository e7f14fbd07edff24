"""Benchmark one `upbeat monitor` tick on the default profile: 5,000 new tweets, the champion
(SmolLM2-135M) scored on 256 prompts cut from them. Prints the tick's wall time and its split.

A throwaway project in a temp folder: the reference is the packaged tweets (what the default
profile's ingest reads), the drop 5,000 Sentiment140 tweets (the sample beside the repo; the
packaged tweets when it is absent), and the champion the packaged SmolLM2 registered in a temp
MLflow store. The first tick downloads the champion from the store (cold); the second checks the
same drop again with the champion cached (warm: every later tick of a deployed monitor). On a
shared machine the CPU seconds (every thread of the process) say more than the wall time.

    .venv/bin/python benchmarks/monitor.py [--rows 5000] [--prompts 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "sentiment140_sample.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--prompts", type=int, default=256)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="upbeat-bench-monitor-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        for name in ("params.yaml", "dvc.yaml"):
            shutil.copy2(ROOT / name, root / name)
        from upbeat.cli import apply_overrides

        apply_overrides(
            root / "params.yaml",
            [f"monitor.max_rows={args.rows}", f"monitor.n_prompts={args.prompts}"],
        )
        from upbeat import registry
        from upbeat.config import load_params
        from upbeat.data.sources import read_packaged, read_sentiment140, save_canonical
        from upbeat.models import PACKAGED_PREFIX, _packaged_dir, cache_root
        from upbeat.monitor import tick

        params = load_params(root / "params.yaml")
        reference = read_packaged(None, 10_000)
        save_canonical(reference, root / params.monitor.reference)
        if SAMPLE.is_file():
            new = read_sentiment140(SAMPLE, 10_000).sample(n=args.rows, random_state=0)
        else:
            new = reference.sample(n=args.rows, random_state=0)
        drop_csv = root / "inputs" / "drop.csv"
        drop_csv.parent.mkdir()
        new.to_csv(drop_csv, header=False, index=False, encoding="latin-1", errors="replace")

        base = params.policy.base.removeprefix(PACKAGED_PREFIX)
        policy = _packaged_dir(base, cache_root())
        name = params.register.model_name
        # registration figures only anchor the champion/*_drop figures; the time is what is measured
        figures = {"after/reward_mean": 0.5, "after/judge_mean": 0.0, "after/distinct_2": 0.9}
        started = time.perf_counter()
        version = registry.register_policy(policy, name, figures)
        registry.promote(name, version, "benchmark")
        print(f"setup: champion registered in {time.perf_counter() - started:.1f} s")

        for label in ("cold (downloads the champion)", "warm (champion cached)"):
            started, cpu = time.perf_counter(), time.process_time()
            result = tick(root, params, drop_csv, log=lambda _: None)
            total, cpu = time.perf_counter() - started, time.process_time() - cpu
            split = ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items())
            print(
                f"tick {label}: {total:.1f} s wall, {cpu:.1f} s CPU (all threads) on "
                f"{int(result.metrics['monitor/rows'])} rows, "
                f"{int(result.metrics.get('champion/n_prompts', 0))} prompts"
            )
            print(
                f"  split (s): {split}; MLflow logging {total - sum(result.seconds.values()):.1f}"
            )
            print(f"  verdict: {result.verdict}")


if __name__ == "__main__":
    main()
