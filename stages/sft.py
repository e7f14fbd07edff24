"""DVC stage `sft`: fine-tune the policy base on the cleaned train tweets -> models/sft.

With `sft.processes` > 1 the script runs itself again under torchrun (one process per share of
each batch, see upbeat/distributed.py) and exits with their exit code; the main process writes
the model, metrics and MLflow records.
"""

from __future__ import annotations

from upbeat.startup import imports_kept

with imports_kept():  # the libraries load with the GC off (upbeat/startup.py)
    import argparse
    import sys

    from upbeat.config import load_params
    from upbeat.data.sources import load_canonical
    from upbeat.distributed import is_main, local_rank, process_group, relaunch
    from upbeat.errors import exit_on_user_error
    from upbeat.models import load_policy, resolve_device, save_policy, set_threads
    from upbeat.progress import Progress
    from upbeat.sft import total_steps, train
    from upbeat.tracking import log_metrics, stage_run, write_csv, write_json

FIELDS = (("loss", "sft/loss", ".3f"), ("lr", "sft/lr", ".1e"), ("eval ppl", "sft/eval_ppl", ".1f"))


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
    if (code := relaunch(params.sft.processes, params.policy, "sft.processes")) is not None:
        sys.exit(code)
    device = resolve_device(params.policy.device, local_rank())
    if device.type == "cpu":
        set_threads(params.policy.num_threads, params.sft.processes)
    train_texts = load_canonical(args.train)["text"].tolist()
    eval_texts = load_canonical(args.eval)["text"].tolist()
    with process_group(device):
        model, tokenizer = load_policy(params.policy.base, device=device)
        if not is_main():  # trains its share of every batch; the main process writes
            train(model, tokenizer, train_texts, eval_texts, params.sft)
            return
        progress = Progress("sft", total_steps(len(train_texts), params.sft), fields=FIELDS)

        def on_step(step: int, metrics: dict[str, float]) -> None:
            log_metrics(metrics, step=step)
            progress.update(step, metrics)

        run_params = {**params.sft.model_dump(), "policy": params.policy.model_dump()}
        with stage_run("sft", run_params):
            with progress:
                result = train(
                    model, tokenizer, train_texts, eval_texts, params.sft, on_step=on_step
                )
            save_policy(model, tokenizer, args.out)
            write_csv(args.curve, result.curve)
            write_json(args.metrics, result.metrics)
            log_metrics(result.metrics)
    m = result.metrics
    print(f"sft: eval perplexity {m['sft/eval_ppl_before']:.1f} -> {m['sft/eval_ppl_after']:.1f}")


if __name__ == "__main__":
    main()
