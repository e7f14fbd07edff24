"""The MLflow Model Registry: register each PPO policy, gate it, and move the `champion` alias.

Aliases, not the deprecated stages: every registered version gets `challenger`; `champion` moves
only when the gate passes (or a person runs `upbeat promote`). The registry is the record:
- version tags hold lineage (`lineage.*`: git commit, dvc.lock hash, data hash, params) and the
  evaluate metrics (`metric.<group/name>`), so the gate compares two versions from tags alone;
- the gate's decision and reasons are tags on the challenger (`gate.*`);
- the registered model's `champion.history` tag lists every champion in order, so `rollback`
  knows where to go back to, and each move is tagged on the version (`champion.how/reason/at`).

Each version also carries its model card (upbeat/model_card.py): the `MODEL_CARD.md` artifact and
the version's description; the gate's decision is written into both when it is made.
The registry is MLflow's own configuration (`MLFLOW_REGISTRY_URI`, else the tracking store, see
upbeat/tracking.py); a server that refuses a request (401/403) is an `UpbeatError` naming what to
set, never mistaken for a missing model or missing files.

`gate()` is a pure function of two metric dicts and the gate params: unit-testable, no MLflow.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import wraps
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from upbeat import model_card
from upbeat.config import GateParams
from upbeat.errors import UpbeatError
from upbeat.tracking import git as _git
from upbeat.tracking import refused, registry_uri, setup_mlflow, tracking_uri

CHALLENGER, CHAMPION = "challenger", "champion"
HISTORY_TAG = "champion.history"
METRIC_PREFIX = "metric."
# The gate's fixed checks read these evaluate metrics (see upbeat/evaluate.py).
JUDGE_DELTA = "delta/judge_mean"
JUDGE_SHARE_DELTA = "delta/judge_positive_share"
KL = "after/kl_mean"
DISTINCT_2 = "after/distinct_2"
OVER_BEST_OF_N = "vs_best_of_n/judge_positive_share"  # upbeat/overoptimisation.py
TAG_LIMIT = 5000  # MLflow's limit on a tag value
REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors")


# --- the gate (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Whether the challenger may become champion, and one reason per check."""

    passed: bool
    reasons: list[str] = field(default_factory=list)


def gate(
    challenger: Mapping[str, float], champion: Mapping[str, float] | None, params: GateParams
) -> Decision:
    """Every check must pass: beat the champion on `params.metric`, the judge agrees, KL and
    diversity in bounds. A missing or NaN metric fails its check (never silently passes)."""
    reasons: list[str] = []
    passed = True

    def value(metrics: Mapping[str, float], key: str) -> float | None:
        got = metrics.get(key)
        return float(got) if got is not None and math.isfinite(float(got)) else None

    def check(ok: bool, text: str) -> None:
        nonlocal passed
        passed = passed and ok
        reasons.append(f"{'pass' if ok else 'FAIL'}: {text}")

    mine = value(challenger, params.metric)
    theirs = value(champion, params.metric) if champion is not None else None
    if mine is None:
        check(False, f"challenger has no finite {params.metric}")
    elif champion is None:
        check(True, f"no champion yet ({params.metric} = {mine:.4f})")
    elif theirs is None:
        check(True, f"champion has no {params.metric} to beat ({params.metric} = {mine:.4f})")
    else:
        beats = mine > theirs
        check(beats, f"{params.metric} {mine:.4f} {'>' if beats else '<='} champion's {theirs:.4f}")

    bounds = (
        (JUDGE_DELTA, ">", params.min_judge_delta),
        (JUDGE_SHARE_DELTA, ">", params.min_judge_share_delta),
        (KL, "<", params.max_kl),
        (DISTINCT_2, ">", params.min_distinct_2),
    )
    for key, op, bound in bounds:
        got = value(challenger, key)
        if got is None:
            check(False, f"challenger has no finite {key}")
            continue
        ok = got > bound if op == ">" else got < bound
        shown = op if ok else {">": "<=", "<": ">="}[op]
        check(ok, f"{key} {got:.4f} {shown} {bound:g}")

    # Best-of-n from the SFT model at PPO's KL: required only when a margin is set, said always.
    over = value(challenger, OVER_BEST_OF_N)
    bound = params.min_judge_share_over_best_of_n
    if bound is not None:
        ok = over is not None and over > bound
        check(
            ok,
            f"{OVER_BEST_OF_N} {'missing' if over is None else f'{over:+.4f}'} "
            f"{'>' if ok else '<='} {bound:g}",
        )
    elif over is not None:
        beats = "beats" if over > 0 else "does NOT beat"
        reasons.append(
            f"note: PPO {beats} best-of-n on the judge's share positive at its KL "
            f"({over:+.4f}; not required: gate.min_judge_share_over_best_of_n null)"
        )
    return Decision(passed, reasons)


# --- lineage -------------------------------------------------------------------------------------


def lineage(root: Path, params: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Tags that say where a model came from: code, pipeline state, data, parameters."""
    # dvc.lock is excluded: the run itself rewrites it before this (its hash is the next tag)
    changed = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock")
    tags = {
        "lineage.git_commit": _git(root, "rev-parse", "HEAD") or "unknown",
        "lineage.git_dirty": str(bool(changed)),
    }
    lock = root / "dvc.lock"
    if lock.is_file():
        tags["lineage.dvc_lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        data = sorted(
            f"{out['path']}:{out.get('md5', '')}"
            for body in stages.values()
            for out in body.get("outs", [])
            if str(out.get("path", "")).startswith("data/")
        )
        if data:
            tags["lineage.data_hash"] = hashlib.sha256("\n".join(data).encode()).hexdigest()
    if params is not None:
        tags["lineage.params"] = json.dumps(params, sort_keys=True, default=str)[:TAG_LIMIT]
    return tags


def pip_requirements() -> list[str]:
    """Exact pins of what loading the policy needs, from this environment."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


# --- registry operations -------------------------------------------------------------------------


def _client() -> Any:
    """A client of the configured tracking store and registry; creates nothing (a reader needs
    no experiment, and may not be allowed to create one on a shared server)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri())  # for mlflow.artifacts' `models:/` downloads
    return MlflowClient(tracking_uri(), registry_uri())


def _check_refused(exc: Exception) -> None:
    """Raise the server's refusal as what to set, before an `except` reads `exc` as 'not found'."""
    if error := refused(exc, registry_uri()):
        raise error from None


def _server_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """A registry operation refused by the server (401/403) ends in one clear UpbeatError."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return func(*args, **kwargs)
        except MlflowException as exc:
            _check_refused(exc)
            raise

    return wrapper


def _signature() -> Any:
    """The pyfunc's signature, built without executing policy_pyfunc.py (it calls set_model)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", 16),
                ParamSpec("temperature", "double", 1.0),
                ParamSpec("seed", "long", 0),
            ]
        ),
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


REWARD_SHA_TAG = "reward.weights_sha256"
REWARD_TAG = "lineage.reward_model"  # on a policy version: the reward it was trained against


@_server_errors
def register_reward(
    model_dir: str | Path, spec: Mapping[str, Any], metrics: Mapping[str, float], model_name: str
) -> str:
    """Register a learned reward model (its head and spec, logged to the active run) as a version
    of `model_name`, tagged with its metrics and training data's md5; weights registered before
    (same SHA-256) keep their version, so re-running register adds none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    sha = str(spec.get("weights_sha256") or "")
    if spec.get("kind") != "learned" or not sha:
        raise UpbeatError("only a learned reward (reward.kind: learned) is registered")
    client = _client()
    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        _check_refused(exc)
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for mv in client.search_model_versions(f"name = '{model_name}'"):
        if mv.tags.get(REWARD_SHA_TAG) == sha:
            return str(mv.version)
    started = mlflow.active_run() is None
    if started:
        setup_mlflow()
        mlflow.start_run(run_name="register-reward")
    try:
        run_id = mlflow.active_run().info.run_id
        with tempfile.TemporaryDirectory(prefix="upbeat-reward-") as tmp:
            (Path(tmp) / "reward_spec.json").write_text(json.dumps(dict(spec), indent=2))
            mlflow.log_artifact(str(Path(tmp) / "reward_spec.json"), "reward_model")
        mlflow.log_artifacts(str(model_dir), "reward_model")
        source = mlflow.get_artifact_uri("reward_model")
    finally:
        if started:
            mlflow.end_run()
    tags = {
        **{f"{METRIC_PREFIX}{key}": repr(float(val)) for key, val in metrics.items()},
        REWARD_SHA_TAG: sha,
        "reward.train_data_md5": str(spec.get("train_data_md5") or ""),
        "reward.backbone": str(spec.get("backbone") or ""),
        "registered_at": _now(),
    }
    mv = client.create_model_version(model_name, source, run_id=run_id, tags=tags)
    return str(mv.version)


@_server_errors
def reward_versions(model_name: str, n_versions: int = 3) -> list[dict[str, Any]]:
    """The newest versions of the learned reward model with their agreement metrics."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        found = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException as exc:
        _check_refused(exc)
        return []
    found = sorted(found, key=lambda mv: int(mv.version), reverse=True)[:n_versions]
    return [
        {
            "version": str(mv.version),
            "metrics": version_metrics(mv),
            "train_data_md5": mv.tags.get("reward.train_data_md5", ""),
            "registered_at": mv.tags.get("registered_at", ""),
        }
        for mv in found
    ]


@_server_errors
def register_policy(
    policy_dir: str | Path,
    model_name: str,
    metrics: Mapping[str, float],
    tags: Mapping[str, str] | None = None,
    card: model_card.CardInputs | None = None,
) -> str:
    """Log `policy_dir` as a pyfunc model in the active run (or a new one), register a new version
    of `model_name`, tag it with lineage and metrics, attach its model card (when given), and
    point `challenger` at it."""
    import mlflow

    policy_dir = Path(policy_dir)
    if not (policy_dir / "config.json").is_file():
        raise UpbeatError(f"{policy_dir}: not a saved policy (no config.json); run the ppo stage")
    client = _client()
    started = mlflow.active_run() is None
    if started:
        setup_mlflow()
        mlflow.start_run(run_name="register")
    try:
        info = mlflow.pyfunc.log_model(
            name="policy",
            python_model=str(Path(__file__).with_name("policy_pyfunc.py")),
            artifacts={"policy": str(policy_dir)},
            signature=_signature(),
            pip_requirements=pip_requirements(),
        )
    finally:
        if started:
            mlflow.end_run()
    every_tag = {
        **{key: str(val)[:TAG_LIMIT] for key, val in (tags or {}).items()},
        **{f"{METRIC_PREFIX}{key}": repr(float(val)) for key, val in metrics.items()},
        "registered_at": _now(),
    }
    # the version is created with all its tags at once: one request, not one per tag
    ver = str(mlflow.register_model(info.model_uri, model_name, tags=every_tag).version)
    if card is not None:
        _write_card(client, model_name, ver, model_card.render(card, ver), info.model_id)
    client.set_registered_model_alias(model_name, CHALLENGER, ver)
    return ver


def _write_card(client: Any, model_name: str, ver: str, text: str, model_id: str | None) -> None:
    """The card as the version's description and, when the version has a logged model (MLflow 3),
    as its `MODEL_CARD.md` artifact, beside MLmodel (`models:/NAME/VERSION/MODEL_CARD.md`)."""
    client.update_model_version(model_name, ver, description=model_card.description(text))
    if model_id:
        with tempfile.TemporaryDirectory(prefix="upbeat-card-") as tmp:
            path = Path(tmp) / model_card.CARD_FILE
            path.write_text(text, encoding="utf-8")
            client.log_model_artifact(model_id, str(path))


def read_card(model_name: str, ver: str, client: Any = None) -> str | None:
    """Version `ver`'s `MODEL_CARD.md`, or None when it has none (registered without a card)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if client is None:
        _client()  # points mlflow.artifacts at the configured store
    uri = f"models:/{model_name}/{ver}/{model_card.CARD_FILE}"
    try:
        return mlflow.artifacts.load_text(uri)
    except MlflowException as exc:
        _check_refused(exc)
        return None
    except OSError:
        return None


def _record_on_card(client: Any, model_name: str, ver: str, text: str, append: bool) -> None:
    """Write a decision about version `ver` into its card's gate section (description and
    artifact), so the card a person reads says whether and why the version became champion."""
    mv = client.get_model_version(model_name, ver)
    described = model_card.set_gate(mv.description or "", text, append)
    card = read_card(model_name, ver, client)
    if card is None:
        client.update_model_version(model_name, ver, description=model_card.description(described))
        return
    _write_card(client, model_name, ver, model_card.set_gate(card, text, append), _model_id(mv))


def _model_id(mv: Any) -> str | None:
    """The logged model behind a version: its `model_id`, which the registry does not always
    fill in, else the id its `models:/m-...` source names."""
    source = str(mv.source or "")
    return mv.model_id or (
        source.removeprefix("models:/") if source.startswith("models:/m-") else None
    )


def _version(client: Any, model_name: str, ver: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(model_name, str(ver))
    except MlflowException as exc:
        _check_refused(exc)
        raise UpbeatError(
            f"model {model_name!r} has no version {ver}; `upbeat status` lists the versions"
        ) from None


def files_problem(model_name: str, ver: str, client: Any = None) -> str | None:
    """Why version `ver` cannot be loaded because its files are gone from the artifact store (e.g.
    the directory was deleted), or None. Reads only the small MLmodel file and one listing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = client or _client()
    uri = f"models:/{model_name}/{ver}"
    try:
        where = client.get_model_version_download_uri(model_name, str(ver))
    except MlflowException as exc:
        _check_refused(exc)
        where = uri
    try:
        spec = yaml.safe_load(mlflow.artifacts.load_text(f"{uri}/MLmodel"))
        rel = spec["flavors"]["python_function"]["artifacts"]["policy"]["path"]
        files = mlflow.artifacts.list_artifacts(artifact_uri=f"{uri}/{rel}")
    except MlflowException as exc:
        _check_refused(exc)
        return f"version {ver}'s files are gone from the artifact store (no MLmodel in {where})"
    except (yaml.YAMLError, KeyError, TypeError):
        return f"version {ver}'s MLmodel in {where} does not describe an upbeat policy"
    if not any(f.path.endswith(".safetensors") for f in files):
        return f"version {ver}'s policy weights are gone from the artifact store ({where}/{rel})"
    return None


def _require_files(client: Any, model_name: str, ver: str, action: str) -> None:
    """Refuse to point `champion` at a version that could not be loaded."""
    if problem := files_problem(model_name, ver, client):
        current = champion_version(model_name, client)
        stays = f"champion stays at version {current.version}" if current else "no champion is set"
        raise UpbeatError(
            f"cannot {action} version {ver}: {problem}; {stays}. `upbeat status` lists the "
            "versions: `upbeat promote VERSION --reason ...` picks one whose files exist"
        )


def champion_version(model_name: str, client: Any = None) -> Any | None:
    """The version `champion` points at, or None when there is none yet."""
    from mlflow.exceptions import MlflowException

    client = client or _client()
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as exc:
        _check_refused(exc)
        return None


def version_metrics(mv: Any) -> dict[str, float]:
    """The evaluate metrics stored on a version's tags."""
    return {
        key.removeprefix(METRIC_PREFIX): float(val)
        for key, val in (mv.tags or {}).items()
        if key.startswith(METRIC_PREFIX)
    }


def champion_history(model_name: str, client: Any = None) -> list[str]:
    """Every version that was champion, oldest first (rollbacks pop the end)."""
    client = client or _client()
    tags = client.get_registered_model(model_name).tags or {}
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def _set_champion(client: Any, model_name: str, ver: str, how: str, reason: str) -> None:
    _require_files(client, model_name, ver, "make champion")
    history = champion_history(model_name, client)
    if how != "rollback":
        history.append(str(ver))
    client.set_registered_model_alias(model_name, CHAMPION, str(ver))
    client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history))
    for key, val in {"how": how, "reason": reason, "at": _now(), "by": getpass.getuser()}.items():
        client.set_model_version_tag(model_name, str(ver), f"champion.{key}", val[:TAG_LIMIT])


@_server_errors
def promote_if_passes(model_name: str, ver: str, params: GateParams) -> Decision:
    """Run the gate for version `ver` against the current champion; move `champion` if it passes."""
    client = _client()
    challenger = _version(client, model_name, ver)
    current = champion_version(model_name, client)
    if current is not None and str(current.version) == str(ver):
        return Decision(False, [f"version {ver} is already the champion"])
    decision = gate(
        version_metrics(challenger), version_metrics(current) if current else None, params
    )
    tags = {
        "gate.passed": str(decision.passed),
        "gate.reasons": "; ".join(decision.reasons),
        "gate.champion_before": str(current.version) if current else "none",
        "gate.at": _now(),
    }
    for key, val in tags.items():
        client.set_model_version_tag(model_name, str(ver), key, val[:TAG_LIMIT])
    if decision.passed:
        _set_champion(client, model_name, str(ver), "gate", "; ".join(decision.reasons))
    verdict = model_card.gate_text(
        decision.passed, decision.reasons, tags["gate.champion_before"], tags["gate.at"]
    )
    _record_on_card(client, model_name, str(ver), verdict, append=False)
    return decision


@_server_errors
def promote(model_name: str, ver: str, reason: str) -> None:
    """Manual override: make `ver` the champion whatever the gate said, and record why."""
    if not reason.strip():
        raise UpbeatError("a manual promotion needs a reason: --reason '...'")
    client = _client()
    _version(client, model_name, ver)
    _set_champion(client, model_name, str(ver), "manual", reason)
    note = (
        f"**made champion by hand** ({_now()}, by {getpass.getuser()}): {model_card.cell(reason)}"
    )
    _record_on_card(client, model_name, str(ver), note, append=True)


@_server_errors
def rollback(model_name: str, reason: str = "rollback") -> str:
    """Point `champion` back at the previous champion; returns that version."""
    client = _client()
    current = champion_version(model_name, client)
    history = champion_history(model_name, client)
    if current is None or len(history) < 2:
        raise UpbeatError(
            f"{model_name!r} has no earlier champion to roll back to "
            f"(history: {history or 'empty'}); use `upbeat promote VERSION --reason ...`"
        )
    if history[-1] != str(current.version):  # the alias was moved outside upbeat: trust it
        history.append(str(current.version))
    history.pop()
    previous = history[-1]
    _require_files(client, model_name, previous, "roll back to")  # before any tag changes
    client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history))
    client.set_model_version_tag(model_name, str(current.version), "rollback.at", _now())
    client.set_model_version_tag(model_name, str(current.version), "rollback.reason", reason)
    _set_champion(client, model_name, previous, "rollback", reason)
    return previous


# --- loading -------------------------------------------------------------------------------------


@_server_errors
def download_policy(uri: str, dst: str | Path | None = None) -> Path:
    """Download a registered model (`models:/NAME@champion`, `models:/NAME/3`) and return the
    policy directory inside it, ready for `upbeat.models.load_policy`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client()
    gone = (
        f"cannot load {uri}: {{}}. `upbeat rollback` points champion back at the previous "
        "champion, or `upbeat promote VERSION --reason ...` at another version (`upbeat status`)"
    )
    if (ver := _uri_version(client, uri)) and (problem := files_problem(*ver, client)):
        raise UpbeatError(gone.format(problem))
    dst = Path(dst or tempfile.mkdtemp(prefix="upbeat-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as exc:
        _check_refused(exc)
        raise UpbeatError(
            f"cannot load {uri}: {exc.message.splitlines()[0]} "
            "(run the pipeline with `upbeat run`, or see `upbeat status`)"
        ) from None
    if not (local / "MLmodel").is_file():
        raise UpbeatError(gone.format("its files are gone from the artifact store"))
    spec = yaml.safe_load((local / "MLmodel").read_text())
    rel = spec["flavors"]["python_function"]["artifacts"]["policy"]["path"]
    return local / rel


def _uri_version(client: Any, uri: str) -> tuple[str, str] | None:
    """(name, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`; None for other URIs or
    when the registry has no such version (the download then reports it)."""
    from mlflow.exceptions import MlflowException

    rest = uri.removeprefix("models:/")
    if rest == uri:
        return None
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, ver = rest.rpartition("/")
        if not (name and ver.isdigit()):
            return None
        return name, str(client.get_model_version(name, ver).version)
    except MlflowException as exc:
        _check_refused(exc)
        return None


@_server_errors
def status(model_name: str, n_versions: int = 5) -> dict[str, Any]:
    """The champion (version, metrics, how it got there, whether its files are still in the
    artifact store) and the latest versions with their gate."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as exc:
        _check_refused(exc)
        return {"model": model_name, "champion": None, "versions": [], "history": []}
    # the registered model holds the aliases (a version found by search carries none)
    aliases: dict[str, list[str]] = {}
    for alias, ver in sorted((model.aliases or {}).items()):
        aliases.setdefault(str(ver), []).append(alias)
    champ = champion_version(model_name, client)
    versions = client.search_model_versions(f"name = '{model_name}'")
    versions = sorted(versions, key=lambda mv: int(mv.version), reverse=True)[:n_versions]
    return {
        "model": model_name,
        "champion": None
        if champ is None
        else {
            "version": str(champ.version),
            "metrics": version_metrics(champ),
            "how": champ.tags.get("champion.how", ""),
            "reason": champ.tags.get("champion.reason", ""),
            "files_problem": files_problem(model_name, str(champ.version), client),
            "reward": champ.tags.get(REWARD_TAG, "-"),
        },
        "history": champion_history(model_name, client),
        "versions": [
            {
                "version": str(mv.version),
                "aliases": aliases.get(str(mv.version), []),
                "gate": mv.tags.get("gate.passed", "-"),
                "registered_at": mv.tags.get("registered_at", ""),
                "reward": mv.tags.get(REWARD_TAG, "-"),
            }
            for mv in versions
        ],
    }
