"""A local team stack of real servers on 127.0.0.1, in a folder of its own (`upbeat stack`).

PostgreSQL (databases for MLflow, its auth, and Prefect) → an S3 endpoint (moto's server) →
the MLflow tracking server (registry in PostgreSQL, artifacts proxied to S3, basic auth on) →
the Prefect server (on PostgreSQL) → a worker polling the `upbeat` process work pool.

`up` starts, in that order, whichever of them is not running and waits until each answers;
`down` stops, in reverse order, only what `up` started (the pid files in `run/`); `status` says
what runs where and which variables point a client at it (`clients.client_env`). The stack's data
survives `down`/`up`: PostgreSQL's on disk, the buckets through a snapshot (see `s3`).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from upbeat.stack import postgres, runs, s3, servers
from upbeat.stack.clients import client_env, export_lines
from upbeat.stack.config import (
    DEFAULT_PORTS,
    WORK_POOL,
    Secrets,
    StackConfig,
    StackError,
    load_secrets,
    port_env,
    resolve,
)
from upbeat.stack.procs import (
    Record,
    alive,
    launch,
    port_taken,
    read_record,
    remove_record,
    stop,
    wait_ready,
    write_record,
)

__all__ = [
    "NAMES",
    "WORK_POOL",
    "StackConfig",
    "StackError",
    "client_env",
    "down",
    "elsewhere",
    "export_lines",
    "exports",
    "resolve",
    "status",
    "up",
    "variables",
]

NAMES = ("postgres", "s3", "mlflow", "prefect", "worker")
"""Start order; `down` goes the other way."""
CANCEL_WAIT = 90  # s for a cancelled run to stop its stage and record its end


@dataclass(frozen=True)
class _Spec:
    """How to start one server and tell that it answers (what can fail runs only when called)."""

    cmd: Callable[[], list[str]]
    env: dict[str, str]
    url: str
    ready: Callable[[], Any]
    timeout: float
    before: Callable[[], Any] = lambda: None
    after: Callable[[], Any] = lambda: None
    user: Callable[[], Any] = lambda: None  # whom to run as (None: this process's user)


def _specs(cfg: StackConfig, sec: Secrets) -> dict[str, _Spec]:
    """Each server's spec, by name."""
    pg_log = cfg.logs / "postgres.log"
    return {
        "postgres": _Spec(
            cmd=lambda: postgres.command(cfg),
            env=servers.base_env(),
            url=f"unix socket in {postgres.socket_dir(cfg)}",
            ready=lambda: postgres.ready(cfg),
            timeout=60,
            before=lambda: postgres.init(cfg, pg_log),
            after=lambda: postgres.ensure_databases(cfg),
            user=postgres.run_user,  # PostgreSQL refuses to run as root
        ),
        "s3": _Spec(
            cmd=lambda: s3.command(cfg),
            env=s3.env(servers.base_env(), sec),
            url=cfg.s3_url,
            ready=lambda: s3.ready(cfg, sec),
            timeout=60,
            after=lambda: s3.restore(cfg, sec),
        ),
        "mlflow": _Spec(
            cmd=lambda: servers.mlflow_command(cfg),
            env=servers.mlflow_env(cfg, sec),
            url=cfg.mlflow_url,
            ready=lambda: servers.mlflow_ready(cfg),
            timeout=180,
            before=lambda: servers.write_mlflow_auth_ini(cfg, sec),
        ),
        "prefect": _Spec(
            cmd=lambda: servers.prefect_command(cfg),
            env=servers.prefect_env(cfg, sec),
            url=cfg.prefect_api,
            ready=lambda: servers.prefect_ready(cfg),
            timeout=180,
            after=lambda: servers.ensure_pool(cfg, sec),
        ),
        "worker": _Spec(
            cmd=servers.worker_command,
            env=servers.worker_env(cfg, sec),
            url=f"work pool {WORK_POOL!r}",
            ready=lambda: servers.online_workers(cfg, sec),
            timeout=120,
        ),
    }


def _port_key(name: str) -> str | None:
    return name if name in DEFAULT_PORTS else None


@contextlib.contextmanager
def _locked(cfg: StackConfig) -> Iterator[None]:
    from filelock import FileLock, Timeout

    cfg.root.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(cfg.root / ".lock", timeout=0):
            yield
    except Timeout:
        raise StackError(
            f"another `upbeat stack` command is working on {cfg.root}: wait for it to finish"
        ) from None


def _running(cfg: StackConfig) -> tuple[StackConfig, dict[str, Record]]:
    """Live servers by name, and the config with their actual ports (they keep theirs)."""
    live = {n: r for n in NAMES if alive(r := read_record(cfg.run, n)) and r is not None}
    ports = cfg.ports()
    for name, rec in live.items():
        if (key := _port_key(name)) and rec.port:
            ports[key] = rec.port
    return cfg.with_ports(ports), live


def _start(name: str, cfg: StackConfig, sec: Secrets) -> Record:
    spec = _specs(cfg, sec)[name]
    log = cfg.logs / f"{name}.log"
    spec.before()
    (cfg.root / "prefect").mkdir(exist_ok=True)  # PREFECT_HOME of the server and the worker
    pid, started = launch(spec.cmd(), env=spec.env, log=log, cwd=cfg.root, user=spec.user())
    key = _port_key(name)
    rec = Record(name, pid, started, spec.url, str(log), cfg.ports()[key] if key else None)
    write_record(cfg.run, rec)
    try:
        wait_ready(name, spec.ready, rec, log, spec.timeout)
        spec.after()
    except BaseException:
        stop(rec, signal.SIGINT if name == "postgres" else signal.SIGTERM)
        remove_record(cfg.run, name)
        raise
    return rec


def _stop(name: str, rec: Record, cfg: StackConfig, sec: Secrets | None) -> str:
    if name == "s3" and sec is not None:
        try:
            kept = s3.snapshot(cfg, sec)
        except Exception as exc:
            raise StackError(
                f"could not copy the buckets from {cfg.s3_url} into {s3.snapshot_dir(cfg)} "
                f"({exc}); the S3 server (pid {rec.pid}) is left running so nothing is lost: "
                "fix the cause and run `upbeat stack down` again"
            ) from exc
        stop(rec)
        return f"stopped (pid {rec.pid}); {kept} objects kept in {s3.snapshot_dir(cfg)}"
    stop(rec, signal.SIGINT if name == "postgres" else signal.SIGTERM)
    return f"stopped (pid {rec.pid})"


def up(
    project: Path, root: Path | None = None, ports: dict[str, int | None] | None = None
) -> tuple[StackConfig, dict[str, str]]:
    """Start whatever of the stack is not running; returns the config and what happened to each.

    Raises StackError, before starting anything, if a port it needs is taken, and if a server
    does not come up (the servers this call started are stopped again).
    """
    cfg = resolve(project, root, ports)
    with _locked(cfg):
        cfg, live = _running(cfg)
        outcome = {n: f"already running (pid {rec.pid})" for n, rec in live.items()}
        todo = [n for n in NAMES if n not in live]
        for name in todo:
            key = _port_key(name)
            if key and (holder := port_taken(cfg.ports()[key])):
                raise StackError(
                    f"port {cfg.ports()[key]} on 127.0.0.1, wanted by the stack's {name} server, "
                    f"is in use by {holder}: stop that process, or choose another port with "
                    f"--{key}-port or {port_env(key)}"
                )
        if not todo:
            return cfg, outcome
        sec = load_secrets(cfg, create=True)
        assert sec is not None
        cfg.logs.mkdir(parents=True, exist_ok=True)
        cfg.save()
        started: list[tuple[str, Record]] = []
        try:
            for name in todo:
                started.append((name, _start(name, cfg, sec)))
                outcome[name] = f"started (pid {started[-1][1].pid})"
        except BaseException:
            for name, rec in reversed(started):
                with contextlib.suppress(Exception):
                    _stop(name, rec, cfg, sec)
                remove_record(cfg.run, name)
            raise
    return cfg, {n: outcome[n] for n in NAMES}


def down(
    project: Path, root: Path | None = None, names: list[str] | None = None, force: bool = False
) -> dict[str, str]:
    """Stop, in reverse start order, the servers whose pid files `up` wrote (only `names`, if
    given: `up` then starts just those again).

    Refuses while a flow run is in progress on the stack, unless `force`: then it cancels those
    runs through Prefect first (`runs`) and says so under the key "runs".
    """
    unknown = sorted(set(names or []) - set(NAMES))
    if unknown:
        raise StackError(f"no server named {', '.join(unknown)}: the stack has {', '.join(NAMES)}")
    cfg = resolve(project, root)
    sec = load_secrets(cfg)
    outcome: dict[str, str] = {}
    with _locked(cfg):
        cfg, live = _running(cfg)
        if "prefect" in live and sec is not None:
            outcome.update(_stop_runs(cfg, sec, live.get("worker"), force))
        for name in reversed([n for n in NAMES if not names or n in names]):
            rec = read_record(cfg.run, name)
            if rec is None:
                outcome[name] = "not running"
                continue
            if name in live:
                outcome[name] = _stop(name, rec, cfg, sec)
            else:
                outcome[name] = "was not running (stale pid file removed)"
            remove_record(cfg.run, name)
    return {n: outcome[n] for n in ("runs", *NAMES) if n in outcome}


def _stop_runs(cfg: StackConfig, sec: Secrets, worker: Record | None, force: bool) -> dict:
    """Refuse (without `force`) or cancel the flow runs in progress; {"runs": what happened}."""
    try:
        active = runs.in_progress(cfg, sec)
    except Exception as exc:  # Prefect not answering (its database down): stop as before
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {"runs": f"Prefect did not say which runs are in progress ({why}); stopping anyway"}
    if not active:
        return {}
    named = ", ".join(f"{r.name} ({r.id}, {r.state})" for r in active)
    if not force:
        raise StackError(
            f"flow run(s) in progress on this stack: {named}. Stopping the servers now would "
            "leave them Running in Prefect and RUNNING in MLflow: wait for them to end, or "
            "`upbeat stack down --force` cancels them first (Cancelled in Prefect, KILLED in "
            "MLflow)"
        )
    left = runs.cancel(cfg, sec, active, CANCEL_WAIT)
    if worker is not None:  # their processes record the end in MLflow after Prefect's state
        with contextlib.suppress(psutil.Error):
            psutil.wait_procs(psutil.Process(worker.pid).children(), timeout=CANCEL_WAIT)
    done = [r for r in active if r not in left]
    text = f"cancelled {', '.join(r.name for r in done)}" if done else ""
    if left:  # e.g. an `upbeat run` by hand on this stack: no worker stops it
        text += (
            f"{'; ' if text else ''}still {', '.join(r.name for r in left)} (no worker stops it)"
        )
    return {"runs": text}


def elsewhere(cfg: StackConfig) -> list[Path]:
    """Folders of other stacks with a server running (each server works in its stack's folder),
    e.g. the stack a second checkout of the project should point UPBEAT_STACK_DIR at."""
    import psutil

    found: set[Path] = set()
    for proc in psutil.process_iter(["cwd"]):
        folder = Path(proc.info["cwd"]) if proc.info.get("cwd") else None
        if folder is None or folder == cfg.root or not (folder / "run").is_dir():
            continue
        for name in NAMES:
            rec = read_record(folder / "run", name)
            if rec is not None and rec.pid == proc.pid and alive(rec):
                found.add(folder)
    return sorted(found)


def status(project: Path, root: Path | None = None) -> tuple[StackConfig, list[dict[str, Any]]]:
    """Per server: running, pid, url, data location, whether it answers now."""
    cfg = resolve(project, root)
    cfg, live = _running(cfg)
    sec = load_secrets(cfg)
    data = {
        "postgres": postgres.data_location(cfg),
        "s3": s3.data_location(cfg),
        "mlflow": "PostgreSQL database mlflow; artifacts in s3://upbeat-mlflow/artifacts",
        "prefect": "PostgreSQL database prefect",
        "worker": f"polls work pool {WORK_POOL!r}; runs flows with the client variables below",
    }
    rows = []
    for name in NAMES:
        rec = live.get(name)
        answers = False
        if rec is not None and sec is not None:
            with contextlib.suppress(Exception):
                answers = bool(_specs(cfg, sec)[name].ready())
        rows.append(
            {
                "name": name,
                "running": rec is not None,
                "answers": answers,
                "pid": rec.pid if rec else None,
                "url": rec.url if rec else "-",
                "data": data[name],
                "log": str(cfg.logs / f"{name}.log"),
            }
        )
    return cfg, rows


def variables(project: Path, root: Path | None = None) -> dict[str, str]:
    """The variables that point MLflow, Prefect, DVC and boto3 at the stack (empty before the
    first `up` generated its credentials)."""
    cfg, _ = _running(resolve(project, root))
    sec = load_secrets(cfg)
    return client_env(cfg, sec) if sec else {}


def exports(project: Path, root: Path | None = None) -> list[str]:
    """`variables` as `export` lines for a shell."""
    return export_lines(variables(project, root))
