"""DVC stage `sft`: fine-tune the policy base on the cleaned train tweets -> models/sft."""

from __future__ import annotations

import argparse

from upbeat.config import load_params
from upbeat.data.sources import load_canonical
from upbeat.errors import exit_on_user_error
from upbeat.models import load_policy, save_policy, set_threads
from upbeat.sft import train
from upbeat.tracking import log_metrics, stage_run, write_csv, write_json


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", required=True, help="cleaned train split (Parquet, `text`)")
    parser.add_argument("--eval", required=True, help="cleaned eval split (Parquet, `text`)")
    parser.add_argument("--out", required=True, help="directory for the fine-tuned model")
    parser.add_argument("--metrics", required=True, help="DVC metrics JSON to write")
    parser.add_argument("--curve", required=True, help="per-step loss CSV (dvc plots)")
    args = parser.parse_args()

    params = load_params()
    set_threads(params.policy.num_threads)
    train_texts = load_canonical(args.train)["text"].tolist()
    eval_texts = load_canonical(args.eval)["text"].tolist()
    with stage_run("sft", {**params.sft.model_dump(), "policy": params.policy.model_dump()}):
        model, tokenizer = load_policy(params.policy.base)
        result = train(model, tokenizer, train_texts, eval_texts, params.sft, log=log_metrics)
        save_policy(model, tokenizer, args.out)
        write_csv(args.curve, result.curve)
        write_json(args.metrics, result.metrics)
        log_metrics(result.metrics)
    m = result.metrics
    print(f"sft: eval perplexity {m['sft/eval_ppl_before']:.1f} -> {m['sft/eval_ppl_after']:.1f}")


if __name__ == "__main__":
    main()
