"""DVC stage `reward`: resolve the reward function into a spec and check it against human labels.

The cleaned splits hold only the SFT subset (`clean.keep_targets`, negatives by default), so the
labelled check re-applies clean's rules to the raw table with every target kept and uses the eval
side of clean's id-hash split: the same cleaned text, held out the same way, with all labels.
"""

from __future__ import annotations

import argparse
import time

from upbeat.config import load_params
from upbeat.data.check import require_passing
from upbeat.data.clean import labelled_eval
from upbeat.data.sources import load_canonical
from upbeat.errors import exit_on_user_error
from upbeat.rewards import agreement, build_spec, load_scorer, save_spec
from upbeat.tracking import log_metrics, stage_run, write_json


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--labelled", required=True, help="canonical table with all targets")
    parser.add_argument("--verdict", required=True, help="validate's verdict JSON")
    parser.add_argument("--out", required=True, help="reward spec JSON to write")
    parser.add_argument("--metrics", required=True, help="DVC metrics JSON to write")
    args = parser.parse_args()

    params = load_params()
    require_passing(args.verdict)
    labelled = labelled_eval(
        load_canonical(args.labelled), params.clean, params.reward.max_eval_examples
    )
    with stage_run("reward", params.reward.model_dump()):
        spec = build_spec(params.reward)
        scorer = load_scorer(spec)
        started = time.perf_counter()
        scores = scorer(labelled["text"].tolist())
        metrics = agreement(scores, labelled["target"].to_numpy())
        metrics["reward/texts_per_s"] = len(scores) / (time.perf_counter() - started)
        metrics["reward/eval_texts"] = float(len(scores))
        save_spec(spec, args.out)
        write_json(args.metrics, metrics)
        log_metrics(metrics)
    print(
        f"reward: {spec.kind} agrees with the labels: accuracy {metrics['reward/accuracy']:.3f}, "
        f"ROC AUC {metrics['reward/roc_auc']:.3f} on {len(scores)} held-out tweets"
    )


if __name__ == "__main__":
    main()
