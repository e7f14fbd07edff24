"""One monitor tick: the tweets that arrived since the last tick, against the champion's data.

A tick (`upbeat monitor [PATH]`, or the deployed `monitor` flow):
1. finds the drops it has not seen (files in `monitor.folder`, a folder or an S3 prefix, or
   PATH), reads each as ingest
   does and validates it with the validate stage's Great Expectations suite (`monitor.min_rows`
   in place of `validate.min_rows`); a drop that fails is reported and never used;
2. compares the new rows with the reference (the validated raw table the champion's pipeline
   ingested) feature by feature and with a domain classifier (`upbeat/drift.py`);
3. continues prompts cut from the new tweets (cleaned and cut as evaluate cuts them) with the
   champion and scores them (reward, judge, distinct-2, length) against its figures at
   registration;
4. decides with thresholds, hysteresis and a cooldown whether this tick fires a retrain;
5. logs one MLflow run in experiment `upbeat-monitor` (figures as metrics, the sample table, the
   drift report and a plot of the figures over ticks as artifacts).

State lives in `monitor.state_dir` (default `.upbeat-monitor/` in the project, ignored by git):
`state.json` (drops seen, each watched figure's arming, the last firing, the last tick) and
`ticks.csv` (the figures of every tick, for the plot). It sits beside the watched folder because
"new since the last tick" is about that folder on this machine, and the deployed flow runs in the
project directory too, so `upbeat monitor` by hand and the scheduled flow share it; a file lock
keeps two ticks from reading the same drops. The cached champion is kept there as well.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from upbeat import drift
from upbeat.config import Params, dvc_vars
from upbeat.data.sources import drop_source, list_drops
from upbeat.errors import DataError, UpbeatError

EXPERIMENT = "upbeat-monitor"
STATE_FILE = "state.json"
TICKS_FILE = "ticks.csv"
LOCK_FILE = "tick.lock"
PLOT_FILE = "monitor.png"
# threshold name (params.yaml monitor.thresholds) -> the metric it watches
WATCHED = {
    "length_psi": "drift/length_psi",
    "oov_rate_psi": "drift/oov_rate_psi",
    "sentiment_psi": "drift/sentiment_psi",
    "labels_psi": "drift/labels_psi",
    "domain_auc": "drift/domain_auc",
    "reward_drop": "champion/reward_drop",
    "judge_drop": "champion/judge_drop",
}
# champion figure on the new prompts -> its figure at registration (evaluate's `after/*`)
REGISTERED = {
    "reward_mean": "after/reward_mean",
    "judge_mean": "after/judge_mean",
    "distinct_2": "after/distinct_2",
    "length_mean": "after/length_mean",
}

Log = Callable[[str], None]


# --- state ---------------------------------------------------------------------------------------


@dataclass
class State:
    """What a tick needs to know of the ticks before it."""

    seen: dict[str, str] = field(default_factory=dict)
    """Each drop read (resolved path or s3:// URL) -> its signature when read."""
    armed: dict[str, bool] = field(default_factory=dict)
    """Per watched figure: may it fire (False after firing, until back under its re-arm)."""
    last_fired: float | None = None
    """Seconds since the epoch of the last firing."""
    last_tick: float | None = None
    ticks: int = 0


def load_state(state_dir: Path) -> State:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return State()
    try:
        return State(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise UpbeatError(
            f"{path}: not a monitor state file ({exc}); delete it to start afresh (every drop "
            "in the folder is then new)"
        ) from None


def save_state(state_dir: Path, state: State) -> None:
    from upbeat.tracking import write_json

    write_json(state_dir / STATE_FILE, state.__dict__)


# --- drops ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drop:
    """One file of new data."""

    path: Path
    """The local file to read (for an S3 object, its downloaded copy)."""
    name: str
    """Where it came from: the file's resolved path, or the object's s3:// URL."""
    signature: str
    """Size and mtime (a file) or size and ETag (an object): a change makes it new again."""


def signature(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def local_drops(target: Path) -> list[Drop]:
    """The data files of a folder (or the file itself)."""
    return [Drop(p, str(p.resolve()), signature(p)) for p in list_drops(target)]


def new_drops(where: str | Path, seen: dict[str, str], cache: Path) -> list[Drop]:
    """Drops of the folder or `s3://bucket/prefix` not read before, or changed since; a new S3
    object is downloaded into `cache` first."""
    if str(where).startswith("s3://"):
        return s3_drops(str(where), seen, cache)
    folder = Path(where)
    if not folder.is_dir():
        return []
    return [d for d in local_drops(folder) if seen.get(d.name) != d.signature]


def s3_drops(url: str, seen: dict[str, str], cache: Path) -> list[Drop]:
    """The new objects under an S3 prefix, downloaded (boto3; endpoint and keys from the usual
    AWS variables, e.g. the stack's `AWS_ENDPOINT_URL`)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    from upbeat.data.sources import IGNORED_FILES

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3")
    found = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key, name = obj["Key"], obj["Key"].rsplit("/", 1)[-1]
                sig = f"{obj['Size']}:{obj['ETag'].strip(chr(34))}"
                if not name or name.startswith(".") or name in IGNORED_FILES:
                    continue
                if seen.get(f"s3://{bucket}/{key}") == sig:
                    continue
                local = cache / bucket / key
                local.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, key, str(local))
                found.append(Drop(local, f"s3://{bucket}/{key}", sig))
    except (BotoCoreError, ClientError) as exc:
        raise UpbeatError(f"{url}: cannot list or read the drops there ({exc})") from exc
    return sorted(found, key=lambda d: d.name)


def read_drop(path: Path, params: Params) -> tuple[Any, dict[str, Any]]:
    """(canonical table or None, verdict) of one drop: ingest, then the validate suite."""
    from upbeat.data.expectations import validate_frame
    from upbeat.data.sources import ingest

    source = drop_source(path, params.monitor.source)
    try:
        df = ingest(params.ingest.model_copy(update={"source": source}), path=path)
    except DataError as exc:
        return None, {"success": False, "stage": "ingest", "summary": str(exc)}
    suite = params.validate.model_copy(update={"min_rows": params.monitor.min_rows})
    verdict = validate_frame(df, suite)
    verdict = {k: v for k, v in verdict.items() if k != "expectations"} | {
        "failed": [n for n, e in verdict["expectations"].items() if not e["success"]]
    }
    return (df if verdict["success"] else None), {**verdict, "stage": "validate", "source": source}


# --- the champion --------------------------------------------------------------------------------


@dataclass
class Champion:
    version: str
    metrics: dict[str, float]
    """Its evaluate figures at registration."""
    tags: dict[str, str]
    model: Any
    tokenizer: Any


def load_champion(params: Params, cache: Path) -> Champion:
    """The `@champion` version, its registration figures, and the policy (downloaded once per
    version into `cache`)."""
    from upbeat import registry
    from upbeat.generation import bf16_for_inference
    from upbeat.models import load_policy, resolve_bf16, resolve_device, set_threads

    name = params.register.model_name
    mv = registry.champion_version(name)
    if mv is None:
        raise UpbeatError(
            f"model {name!r} has no champion to monitor: run the pipeline first (`upbeat run`)"
        )
    target = cache / f"champion-v{mv.version}"
    done = target / ".complete"
    if not done.is_file():
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        policy = registry.download_policy(f"models:/{name}/{mv.version}", target / "download")
        (target / "policy").parent.mkdir(parents=True, exist_ok=True)
        policy.rename(target / "policy")
        shutil.rmtree(target / "download", ignore_errors=True)
        done.touch()
    device = resolve_device(params.policy.device)
    if device.type == "cpu":
        set_threads(params.policy.num_threads)
    model, tokenizer = load_policy(str(target / "policy"), device=device)
    if resolve_bf16(params.evaluate.bf16, device, "evaluate.bf16"):  # sampled as evaluate samples
        bf16_for_inference(model)
    return Champion(
        str(mv.version), registry.version_metrics(mv), dict(mv.tags or {}), model, tokenizer
    )


def score_champion(
    champion: Champion,
    prompts: list[str],
    reward: Callable[[list[str]], np.ndarray],
    judge: Callable[[list[str]], np.ndarray],
    params: Params,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The champion's figures on `prompts` (as evaluate's "after" side) and how far each fell
    since registration; plus the sample table."""
    from upbeat.evaluate import distinct_n, mean_length, share_positive
    from upbeat.generation import sample_continuations
    from upbeat.rewards import as_scored

    p = params.evaluate
    texts = sample_continuations(
        champion.model,
        champion.tokenizer,
        prompts,
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        seed=params.monitor.seed,
        batch_size=p.batch_size,
    )
    # the reward reads a continuation as PPO and evaluate did (`ppo.score_on`); the judge alone
    read = as_scored(prompts, texts, params.ppo.score_on)
    r, j = np.asarray(reward(read), float), np.asarray(judge(texts), float)
    out = {
        "champion/n_prompts": float(len(prompts)),
        "champion/reward_mean": float(r.mean()),
        "champion/reward_positive_share": share_positive(r),
        "champion/judge_mean": float(j.mean()),
        "champion/judge_positive_share": share_positive(j),
        "champion/distinct_2": distinct_n(texts, 2),
        "champion/length_mean": mean_length(texts),
    }
    for name, key in REGISTERED.items():
        if (then := champion.metrics.get(key)) is not None:
            out[f"champion/registered_{name}"] = then
    for name in ("reward", "judge"):
        if (then := champion.metrics.get(f"after/{name}_mean")) is not None:
            out[f"champion/{name}_drop"] = then - out[f"champion/{name}_mean"]
    table = [
        {"prompt": pr, "continuation": t, "reward": round(float(a), 4), "judge": round(float(b), 4)}
        for pr, t, a, b in zip(prompts, texts, r, j, strict=True)
    ]
    return out, table


# --- the tick ------------------------------------------------------------------------------------


@dataclass
class TickResult:
    status: str
    """`no-data` (nothing new), `rejected` (every new drop failed validation) or `checked`."""
    verdict: str
    """One line for a person."""
    fired: bool = False
    drift: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    """Drop -> why it was refused."""
    champion: str | None = None
    run_id: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each phase of the tick."""

    def payload(self) -> dict[str, Any]:
        """What the drift event carries: the reason and the figures behind it."""
        return {
            "reason": "; ".join(self.reasons),
            "figures": {  # finite only: an event's payload is JSON
                k: v for k, v in self.metrics.items() if k in WATCHED.values() and math.isfinite(v)
            },
            "champion_version": self.champion,
            "drops": self.drops,
            "monitor_run_id": self.run_id,
        }


def tick(
    root: Path,
    params: Params,
    path: Path | None = None,
    now: float | None = None,
    log: Log = print,
) -> TickResult:
    """Run one tick on the project at `root` (see the module docstring); `path` checks that file
    or folder instead of the new drops of `monitor.folder`."""
    from filelock import FileLock, Timeout

    m = params.monitor
    state_dir = _under(root, m.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(state_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UpbeatError(
            f"another monitor tick is running (lock {state_dir / LOCK_FILE}); try again later"
        ) from None
    try:
        return _tick(root, params, state_dir, path, time.time() if now is None else now, log)
    finally:
        lock.release()


def _under(root: Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else root / path


def drop_folder(root: Path, params: Params) -> Path | str:
    """`monitor.folder` (a folder or an `s3://bucket/prefix`), else the folder ingest reads its
    drops from (dvc.yaml's `inputs`)."""
    folder = params.monitor.folder or dvc_vars(root)["inputs"]
    return folder if folder.startswith("s3://") else _under(root, folder)


def reference_path(root: Path, params: Params) -> Path:
    """`monitor.reference`, else the raw table the pipeline ingested (dvc.yaml's `raw`)."""
    return _under(root, params.monitor.reference or dvc_vars(root)["raw"])


def _tick(
    root: Path, params: Params, state_dir: Path, path: Path | None, now: float, log: Log
) -> TickResult:
    import pandas as pd

    m = params.monitor
    state = load_state(state_dir)
    clock = _Clock()
    where = path if path is not None else drop_folder(root, params)
    if path is not None:
        drops = local_drops(path)
    else:
        drops = new_drops(where, state.seen, state_dir / "s3")
    if not drops:
        return TickResult("no-data", f"no new data in {where} since the last tick: nothing to do")

    frames, result = [], TickResult("checked", "")
    for drop in drops:
        df, verdict = read_drop(drop.path, params)
        state.seen[drop.name] = drop.signature
        if df is None:
            result.rejected[drop.name] = verdict["summary"]
            log(f"monitor: {drop.name} refused ({verdict['stage']}): {verdict['summary']}")
        else:
            frames.append(df)
            result.drops.append(drop.name)
    clock.lap("read_validate")
    if not frames:
        result.status = "rejected"
        result.verdict = (
            f"every new drop failed validation ({', '.join(result.rejected)}): nothing checked"
        )
        state.last_tick = now
        save_state(state_dir, state)
        return result

    current = pd.concat(frames, ignore_index=True)
    if len(current) > m.max_rows:
        current = current.sample(n=m.max_rows, random_state=m.seed).reset_index(drop=True)
    reference = _reference(root, params)
    clock.lap("reference")
    champion = load_champion(params, state_dir / "cache")
    result.champion = champion.version
    clock.lap("load_champion")
    spec = _reward_spec(root, params)
    from upbeat.rewards import load_scorer

    scorer = load_scorer(spec)
    metrics, prompts_from = _data_drift(reference, current, champion.tokenizer, scorer, params)
    clock.lap("data_drift")
    table: list[dict[str, Any]] = []
    prompts = _prompts(current, champion.tokenizer, params) if m.n_prompts else []
    if prompts:
        from upbeat.judge import load_judge

        judge = load_judge(params.evaluate.judge, spec)
        clock.lap("load_judge")
        scored, table = score_champion(champion, prompts, scorer, judge, params)
        metrics.update(scored)
        clock.lap("score_champion")
    elif m.n_prompts:
        log("monitor: no usable prompts in the new tweets (clean keeps none): champion not scored")
    metrics.update(prompts_from)
    metrics["monitor/rows"] = float(len(current))
    metrics["monitor/rejected_drops"] = float(len(result.rejected))

    decision = drift.decide(
        {name: metrics.get(key, float("nan")) for name, key in WATCHED.items()},
        m.thresholds.model_dump(),
        m.rearm.model_dump(),
        state.armed,
        now,
        state.last_fired,
        m.cooldown_minutes * 60,
    )
    result.metrics, result.reasons = metrics, decision.reasons
    result.drift, result.fired = decision.drift, decision.fired
    result.verdict = _verdict(result, decision, len(current))
    state.armed, state.last_tick, state.ticks = decision.armed, now, state.ticks + 1
    if decision.fired:
        state.last_fired = now
    metrics["monitor/drift"] = float(decision.drift)
    metrics["monitor/fired"] = float(decision.fired)
    _append_tick(state_dir, now, metrics)
    result.seconds = clock.laps
    result.run_id = _log_run(root, params, state_dir, result, decision, table, champion, now)
    save_state(state_dir, state)  # last: a tick that failed before here reads its drops again
    return result


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        t = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + t - self._last
        self._last = t


def _verdict(result: TickResult, decision: drift.Decision, rows: int) -> str:
    where = f"{rows} new rows from {len(result.drops)} drop(s), champion v{result.champion}"
    skipped = f"; {len(result.rejected)} drop(s) refused" if result.rejected else ""
    if decision.fired:
        return f"DRIFT: {'; '.join(decision.reasons)} ({where}{skipped}): retrain triggered"
    if decision.drift:
        return f"drift held back: {'; '.join(decision.reasons)}; {decision.held} ({where}{skipped})"
    auc = result.metrics.get("drift/domain_auc", float("nan"))
    return f"no drift: domain AUC {auc:.3f}, every figure under its threshold ({where}{skipped})"


def _reference(root: Path, params: Params) -> Any:
    from upbeat.data.sources import load_canonical

    path = reference_path(root, params)
    if not path.is_file():
        raise UpbeatError(
            f"{path}: the champion's training data is not here (monitor.reference); `dvc pull` "
            "or run the pipeline (`upbeat run`) to produce it"
        )
    return load_canonical(path)


def _reward_spec(root: Path, params: Params) -> Any:
    """The spec PPO and evaluate scored with (the reward stage's output), else built afresh."""
    from upbeat.rewards import build_spec, load_spec

    path = root / dvc_vars(root)["reward_spec"]
    return load_spec(path) if path.is_file() else build_spec(params.reward)


def _data_drift(
    reference: Any, current: Any, tokenizer: Any, scorer: Any, params: Params
) -> tuple[dict[str, float], dict[str, float]]:
    """Every drift figure of the new rows against the reference, and a few counts."""
    m = params.monitor
    ref = reference.sample(frac=1.0, random_state=m.seed).reset_index(drop=True)
    n = min(m.reference_rows, len(ref) // 2)
    vocab_rows, ref = ref.iloc[:n], ref.iloc[n : 2 * n]  # vocabulary from rows not compared

    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    vocabulary = drift.token_vocabulary(ids(vocab_rows["text"].astype(str).tolist()))

    def sample(df: Any) -> drift.Sample:
        texts = df["text"].astype(str).tolist()
        labels = df["target"].tolist()
        return drift.make_sample(texts, labels, ids(texts), vocabulary, scorer(texts))

    figures = drift.compare(sample(ref), sample(current), m.psi_bins, m.cv_folds, m.seed)
    return figures, {"monitor/reference_rows": float(len(ref))}


def _prompts(current: Any, tokenizer: Any, params: Params) -> list[str]:
    """Prompts cut from the new tweets as evaluate cuts its eval split: cleaned by the clean
    stage's rules (its `keep_targets` too: the champion was measured on those), then the first
    2-8 tokens."""
    from upbeat.data.clean import clean_tweets
    from upbeat.evaluate import make_prompts

    cleaned = clean_tweets(current, params.clean)
    texts = _texts(cleaned.train) + _texts(cleaned.eval)
    return make_prompts(
        texts,
        tokenizer,
        params.monitor.n_prompts,
        params.ppo.prompt_min_tokens,
        params.ppo.prompt_max_tokens,
        params.monitor.seed,
    )


def _texts(df: Any) -> list[str]:
    return df["text"].astype(str).tolist()


# --- records -------------------------------------------------------------------------------------

PLOTTED = (*WATCHED.values(), "champion/reward_mean", "champion/judge_mean")


def _append_tick(state_dir: Path, now: float, metrics: dict[str, float]) -> None:
    """One row per tick in `ticks.csv` (the plot's data), columns fixed by `PLOTTED`."""
    path = state_dir / TICKS_FILE
    new = not path.is_file()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["time", *PLOTTED, "monitor/fired"])
        when = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
        row = [metrics.get(k, float("nan")) for k in (*PLOTTED, "monitor/fired")]
        writer.writerow([when, *(f"{v:.6g}" for v in row)])


def plot_ticks(state_dir: Path, params: Params) -> Path:
    """The watched figures over ticks, each against its threshold, as a PNG."""
    import pandas as pd

    from upbeat.plots import _pyplot

    plt = _pyplot()
    ticks = pd.read_csv(state_dir / TICKS_FILE, parse_dates=["time"])
    limits = params.monitor.thresholds.model_dump()
    fig, axes = plt.subplots(len(WATCHED), 1, figsize=(8, 1.8 * len(WATCHED)), sharex=True)
    for ax, (name, key) in zip(axes, WATCHED.items(), strict=True):
        ax.plot(ticks["time"], ticks[key], marker="o")
        ax.axhline(limits[name], color="red", linestyle="--", linewidth=1)
        fired = ticks[ticks["monitor/fired"] > 0]
        ax.scatter(fired["time"], fired[key], color="red", zorder=3)
        ax.set_ylabel(name, fontsize=8)
    axes[0].set_title("upbeat monitor: figures per tick (dashed: threshold; red: fired)")
    fig.autofmt_xdate()
    fig.tight_layout()
    out = state_dir / PLOT_FILE
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _log_run(
    root: Path,
    params: Params,
    state_dir: Path,
    result: TickResult,
    decision: drift.Decision,
    table: list[dict[str, Any]],
    champion: Champion,
    now: float,
) -> str:
    """One MLflow run for the tick: metrics, tags, the drift report, sample table and plot."""
    import tempfile

    import mlflow

    from upbeat.registry import lineage
    from upbeat.tracking import log_metrics, setup_mlflow, write_csv, write_json

    setup_mlflow(root, EXPERIMENT)
    workspace = lineage(root).get("lineage.data_hash")
    matches = workspace is not None and workspace == champion.tags.get("lineage.data_hash")
    tags = {
        "upbeat.monitor.verdict": result.verdict[:5000],
        "upbeat.monitor.fired": str(result.fired),
        "upbeat.monitor.drift": str(result.drift),
        "upbeat.monitor.champion_version": str(champion.version),
        "upbeat.monitor.reference_is_champion_data": str(matches),
    }
    report = {
        "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "verdict": result.verdict,
        "fired": result.fired,
        "drift": result.drift,
        "reasons": decision.reasons,
        "held": decision.held,
        "armed": decision.armed,
        "thresholds": params.monitor.thresholds.model_dump(),
        "rearm": params.monitor.rearm.model_dump(),
        "drops": result.drops,
        "rejected": result.rejected,
        "champion_version": champion.version,
        "reference": str(reference_path(root, params)),
        "reference_is_champion_data": matches,
        "metrics": {k: (v if math.isfinite(v) else None) for k, v in result.metrics.items()},
        "seconds": result.seconds,
    }
    with mlflow.start_run(run_name=f"tick {report['time']}", tags=tags) as run:
        log_metrics(result.metrics)
        log_metrics({f"monitor/seconds_{k}": v for k, v in result.seconds.items()})
        with tempfile.TemporaryDirectory(prefix="upbeat-monitor-") as tmp:
            write_json(Path(tmp) / "drift_report.json", report)
            mlflow.log_artifact(str(Path(tmp) / "drift_report.json"))
            if table:
                write_csv(Path(tmp) / "samples.csv", table)
                mlflow.log_artifact(str(Path(tmp) / "samples.csv"))
        mlflow.log_artifact(str(plot_ticks(state_dir, params)))
        return run.info.run_id
