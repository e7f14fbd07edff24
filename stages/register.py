"""DVC stage `register`: the PPO policy -> a new MLflow registry version with its model card,
alias `challenger`; a learned reward model -> a version of its own registered model, which the
policy's lineage tags and card name."""

from __future__ import annotations

from upbeat.startup import imports_kept

with imports_kept():  # the libraries load with the GC off (upbeat/startup.py)
    import argparse
    import os
    from pathlib import Path

    from upbeat.config import load_params
    from upbeat.errors import exit_on_user_error
    from upbeat.model_card import load_card_inputs
    from upbeat.registry import REWARD_TAG, lineage, register_policy, register_reward
    from upbeat.tracking import REASON_ENV, project_root, read_json, stage_run, write_json


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ppo", required=True, help="PPO policy directory")
    parser.add_argument("--evaluate", required=True, help="evaluate's metrics JSON")
    parser.add_argument("--samples", required=True, help="evaluate's sample table CSV")
    parser.add_argument("--reward-spec", required=True, help="the reward spec PPO trained against")
    parser.add_argument("--reward-model", required=True, help="a learned reward model's directory")
    parser.add_argument("--reward-metrics", required=True, help="the reward stage's metrics JSON")
    parser.add_argument("--out", required=True, help="JSON naming the registered version")
    args = parser.parse_args()

    params = load_params()
    name = params.register.model_name
    # in this process: the registry logs the model to this stage's MLflow run
    with stage_run("register", params.register.model_dump(), in_process=True) as run:
        metrics = read_json(args.evaluate)
        spec = read_json(args.reward_spec)
        reward_ref = f"{spec['kind']}"
        reward_metrics = read_json(args.reward_metrics)
        if spec["kind"] == "learned":
            reward_name = params.register.reward_model_name
            reward_version = register_reward(args.reward_model, spec, reward_metrics, reward_name)
            reward_ref = f"{reward_name}/{reward_version}"
        root = project_root()
        tags = lineage(root, params.model_dump(by_alias=True, exclude={"profiles"}))
        tags[REWARD_TAG] = reward_ref
        reason = os.environ.get(REASON_ENV, "")  # set by a retrain run started for a reason
        if reason:
            tags["retrain.reason"] = reason
        card = load_card_inputs(
            root,
            params,
            metrics,
            Path(args.samples),
            tags["lineage.git_commit"],
            reward_version=reward_ref,
            reason=reason,
            reward_metrics=reward_metrics,
        )
        version = register_policy(args.ppo, name, metrics, tags, card)
        write_json(
            args.out,
            {
                "model_name": name,
                "version": version,
                "run_id": run.run_id,
                "reward": reward_ref,
            },
        )
    print(
        f"register: {name} version {version} (alias challenger, model card attached), "
        f"trained against reward {reward_ref}"
    )


if __name__ == "__main__":
    main()
