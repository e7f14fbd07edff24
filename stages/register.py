"""DVC stage `register`: the PPO policy -> a new MLflow registry version with its model card,
alias `challenger`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from upbeat.config import load_params
from upbeat.errors import exit_on_user_error
from upbeat.model_card import load_card_inputs
from upbeat.registry import lineage, register_policy
from upbeat.tracking import REASON_ENV, project_root, read_json, stage_run, write_json


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ppo", required=True, help="PPO policy directory")
    parser.add_argument("--evaluate", required=True, help="evaluate's metrics JSON")
    parser.add_argument("--samples", required=True, help="evaluate's sample table CSV")
    parser.add_argument("--out", required=True, help="JSON naming the registered version")
    args = parser.parse_args()

    params = load_params()
    name = params.register.model_name
    with stage_run("register", params.register.model_dump()) as run:
        metrics = read_json(args.evaluate)
        root = project_root()
        tags = lineage(root, params.model_dump(by_alias=True, exclude={"profiles"}))
        reason = os.environ.get(REASON_ENV, "")  # set by a retrain run started for a reason
        if reason:
            tags["retrain.reason"] = reason
        card = load_card_inputs(
            root, params, metrics, Path(args.samples), tags["lineage.git_commit"], reason=reason
        )
        version = register_policy(args.ppo, name, metrics, tags, card)
        write_json(args.out, {"model_name": name, "version": version, "run_id": run.info.run_id})
    print(f"register: {name} version {version} (alias challenger, model card attached)")


if __name__ == "__main__":
    main()
