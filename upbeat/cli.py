"""`upbeat`: run, schedule, inspect and steer the pipeline from one command.

Every command works on the project in the current directory (the one holding `dvc.yaml` and
`params.yaml`). Heavy imports (torch, mlflow, prefect) happen inside the commands, so
`upbeat --help` answers at once. A problem the user can fix prints one red line and what to do,
and exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="upbeat",
    help="A reproducible, scheduled RLHF pipeline: SFT on tweets, PPO towards positive replies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


# --- helpers -------------------------------------------------------------------------------------


def fail(message: str, hint: str = "") -> typer.Exit:
    """Print the error (and what to do) to stderr; the caller raises the returned Exit."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[dim]→ {hint}[/]", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's user-fixable errors into one clear message and exit code 1."""
    from upbeat.config import ConfigError
    from upbeat.errors import UpbeatError

    try:
        yield
    except ConfigError as exc:
        raise fail(
            str(exc), "fix params.yaml or the --set value; upbeat/config.py documents each key"
        ) from None
    except UpbeatError as exc:
        raise fail(str(exc)) from None


def project() -> Path:
    """The project directory (dvc.yaml + params.yaml at or above the current directory)."""
    from upbeat.tracking import project_root

    root = project_root()
    if not (root / "dvc.yaml").is_file():
        raise fail(
            f"{Path.cwd()} is not inside an upbeat project (no dvc.yaml)", "cd to the project"
        )
    return root


def model_name(root: Path) -> str:
    from upbeat.config import load_params

    return load_params(root / "params.yaml").register.model_name


# --- --set overrides, written into params.yaml --------------------------------------------------


def plan_overrides(raw: dict[str, Any], items: list[str]) -> list[tuple[list[str], Any]]:
    """Where each `key=value` goes in params.yaml, as a path of mapping keys.

    A key the active profile also sets is written into that profile: otherwise the profile would
    win again on the next load and the override would silently do nothing.
    """
    from upbeat.config import parse_override

    overrides = dict(parse_override(item) for item in items)
    profile = overrides.get("profile", raw.get("profile", "default"))
    profile_keys = ((raw.get("profiles") or {}).get(profile) or {}) if profile != "default" else {}
    return [
        (["profiles", profile, key] if key in profile_keys else key.split("."), value)
        for key, value in overrides.items()
    ]


def apply_overrides(params_file: Path, items: list[str]) -> list[str]:
    """Validate `key=value` overrides against the schema, then write them into params.yaml
    (comments and layout kept, like `dvc exp run -S`). Nothing is written if any is invalid."""
    import copy

    from ruamel.yaml import YAML

    from upbeat.config import read_params_file, resolve, set_dotted, validate_params

    raw = read_params_file(params_file)
    plan = plan_overrides(raw, items)
    candidate = copy.deepcopy(raw)
    for path, value in plan:
        set_dotted(candidate, path, value)
    validate_params(resolve(candidate), f"{params_file} with --set {' '.join(items)}")

    yaml = YAML()  # round-trip mode: comments, order and quoting survive
    yaml.preserve_quotes = True
    doc = yaml.load(params_file.read_text(encoding="utf-8"))
    for path, value in plan:
        set_dotted(doc, path, value)
    tmp = params_file.with_name(f".{params_file.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        yaml.dump(doc, f)
    tmp.replace(params_file)
    return [".".join(path) for path, _ in plan]


# --- commands ------------------------------------------------------------------------------------


@app.command()
def run(
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-S", help="Override a parameter, e.g. --set ppo.steps=10 (repeatable)."
        ),
    ] = None,
    lock_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for another run to finish (0: refuse at once).")
    ] = 0,
) -> None:
    """Run the pipeline through the Prefect flow (DVC skips what is up to date)."""
    root = project()
    with user_errors():
        if set_:
            written = apply_overrides(root / "params.yaml", set_)
            console.print(f"params.yaml: set {', '.join(written)}")
        from upbeat.config import load_params

        load_params(root / "params.yaml")  # fail here, not three stages in
    from flows import retrain as flows
    from flows.pipeline import PlanError
    from flows.processes import Stopped

    try:
        results = flows.run(root, lock_timeout=lock_timeout)
    except (flows.LockHeld, PlanError) as exc:
        raise fail(str(exc)) from None
    except flows.StageFailed as exc:
        raise fail(
            str(exc),
            "fix the cause and run `upbeat run` again: finished stages are kept and skipped, the "
            "champion model is unchanged",
        ) from None
    except flows.PushFailed as exc:
        raise fail(str(exc)) from None
    except Stopped as exc:
        err.print(
            f"[bold red]stopped:[/] {exc}; the running stage was stopped and nothing after it ran. "
            "`upbeat run` again resumes (PPO from its last checkpoint)",
            highlight=False,
        )
        raise typer.Exit(exc.exit_code) from None
    table = Table("stage", "result", title="retrain")
    for stage, outcome in results.items():
        table.add_row(stage, "[green]ran[/]" if outcome == "ran" else "[dim]up to date[/]")
    console.print(table)


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="Cron schedule (server time zone).")] = "0 3 * * *",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
) -> None:
    """Serve the retrain flow as a scheduled Prefect deployment (blocks; Ctrl-C stops)."""
    root = project()
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        err.print(
            "[yellow]note:[/] PREFECT_API_URL is not set: serving on a temporary local server "
            "(schedules stop with this process). For a persistent one: `prefect server start "
            "--host 127.0.0.1` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`."
        )
    from flows import retrain as flows
    from flows.processes import interrupt_on_sigterm, prefect_api

    # SIGTERM stops serving like Ctrl-C; a temporary server is stopped with it, never orphaned.
    with contextlib.suppress(KeyboardInterrupt), interrupt_on_sigterm(), prefect_api():
        flows.serve(str(root), cron=cron, name=name)


@app.command()
def deploy(
    cron: Annotated[
        str | None, typer.Option(help="Cron schedule, in UTC (none: runs only when triggered).")
    ] = "0 3 * * *",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
    pool: Annotated[
        str, typer.Option(help="Work pool whose workers run it (the local stack's: upbeat).")
    ] = "upbeat",
    monitor_cron: Annotated[
        str, typer.Option(help="The drift monitor's schedule, in UTC ('': no monitor).")
    ] = "*/30 * * * *",
) -> None:
    """Deploy the retrain flow to a work pool on the Prefect server (PREFECT_API_URL): its
    workers run it on the schedule, one run at a time, and whenever the drift monitor (deployed
    beside it) fires."""
    root = project()
    from flows.deploy import DeployError
    from flows.deploy import deploy as deploy_flow

    try:
        deployment_id = deploy_flow(
            root, pool, cron=cron or None, name=name, monitor_cron=monitor_cron or None
        )
    except DeployError as exc:
        raise fail(str(exc)) from None
    when = f"on cron {cron!r} (UTC)" if cron else "when triggered"
    console.print(
        f"deployed retrain/{name} ({deployment_id}) to work pool {pool!r}: runs {when}, one at a "
        f"time, in {root}",
        highlight=False,
        soft_wrap=True,
    )
    if monitor_cron:
        console.print(
            f"deployed monitor/{name}: a drift tick on cron {monitor_cron!r} (UTC); on drift it "
            "emits upbeat.drift.detected, which triggers retrain",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"run it now: prefect deployment run 'retrain/{name}'", highlight=False)


@app.command()
def status(
    runs: Annotated[int, typer.Option("--runs", "-n", help="How many recent runs to show.")] = 5,
) -> None:
    """Which servers are in use, recent pipeline runs, the champion model and its metrics."""
    root = project()
    from mlflow import MlflowClient

    from upbeat import registry
    from upbeat.endpoints import in_use
    from upbeat.tracking import EXPERIMENT, setup_mlflow, tracking_uri

    servers = Table("", "in use", "configured by", title="servers")
    for end in in_use(root):  # shown first: it says where to look when a server refuses below
        servers.add_row(end.role, end.where, end.note)
    console.print(servers)
    with user_errors():
        setup_mlflow(root)
        client = MlflowClient(tracking_uri(root))
        exp = client.get_experiment_by_name(EXPERIMENT)
        found = client.search_runs(
            [exp.experiment_id],
            filter_string="tags.`upbeat.flow` = 'retrain'",
            order_by=["attributes.start_time DESC"],
            max_results=runs,
        )
        table = Table(
            "started (UTC)", "status", "minutes", "stages run", "run id", title="recent runs"
        )
        for r in found:
            start = datetime.fromtimestamp(r.info.start_time / 1000, UTC)
            end = r.info.end_time or r.info.start_time
            ran = [
                k.removeprefix("stage.")
                for k, v in r.data.tags.items()
                if k.startswith("stage.") and v == "ran"
            ]
            colour = {"FINISHED": "green", "FAILED": "red"}.get(r.info.status, "yellow")
            table.add_row(
                start.strftime("%Y-%m-%d %H:%M"),
                f"[{colour}]{r.info.status}[/]",
                f"{(end - r.info.start_time) / 60000:.1f}",
                ", ".join(ran) or "-",
                r.info.run_id[:8],
            )
        console.print(table if found else "no pipeline runs yet: `upbeat run`")

        info = registry.status(model_name(root))
        champ = info["champion"]
        if champ is None:
            console.print(f"model {info['model']!r}: no champion yet")
        else:
            metrics = Table(
                "metric",
                "value",
                title=f"champion: {info['model']} v{champ['version']} ({champ['how']})",
            )
            for key in sorted(champ["metrics"]):
                if key.startswith(("after/", "delta/")) and "_ci_" not in key:
                    metrics.add_row(key, f"{champ['metrics'][key]:.4f}")
            console.print(metrics)
            if champ["reason"]:
                console.print(f"[dim]why: {champ['reason']}[/]", highlight=False)
            if champ["files_problem"]:
                console.print(
                    f"[bold red]champion cannot be loaded:[/] {champ['files_problem']}; "
                    "`upbeat rollback` points it back at the previous champion",
                    highlight=False,
                    soft_wrap=True,
                )
        if info["versions"]:
            versions = Table(
                "version", "aliases", "gate passed", "registered", title="latest versions"
            )
            for v in info["versions"]:
                versions.add_row(
                    v["version"], ", ".join(v["aliases"]), v["gate"], v["registered_at"]
                )
            console.print(versions)


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Registered model version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why (recorded on the version).")],
) -> None:
    """Make VERSION the champion, whatever the gate said (recorded with your reason)."""
    root = project()
    from upbeat import registry

    with user_errors():
        name = model_name(root)
        registry.promote(name, version, reason)
    console.print(f"{name}: champion -> version {version}")


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why (recorded on the version).")] = "manual rollback",
) -> None:
    """Point champion back at the previous champion."""
    root = project()
    from upbeat import registry

    with user_errors():
        name = model_name(root)
        version = registry.rollback(name, reason)
    console.print(f"{name}: champion rolled back to version {version}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="models:/NAME@alias, models:/NAME/VERSION or a local policy directory "
            "[default: models:/<register.model_name>@champion]."
        ),
    ] = None,
    n: Annotated[int, typer.Option("-n", help="How many continuations.", min=1)] = 3,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="[default: evaluate.max_new_tokens]")
    ] = None,
    temperature: Annotated[float, typer.Option(min=0.01)] = 1.0,
    seed: int = 0,
) -> None:
    """Continue PROMPT with a registered model (the champion by default)."""
    root = project()
    from upbeat.config import load_params

    with user_errors():
        params = load_params(root / "params.yaml")
        uri = model or f"models:/{params.register.model_name}@champion"
        with console.status(f"loading {uri}"):
            from upbeat.generation import sample_continuations
            from upbeat.models import load_policy, set_threads
            from upbeat.registry import download_policy

            set_threads(params.policy.num_threads)
            path = download_policy(uri) if uri.startswith("models:/") else Path(uri)
            policy, tokenizer = load_policy(str(path))
        texts = sample_continuations(
            policy,
            tokenizer,
            [prompt] * n,
            max_new_tokens=max_new_tokens or params.evaluate.max_new_tokens,
            temperature=temperature,
            seed=seed,
            batch_size=n,
        )
    for text in texts:
        console.print(f"[dim]{prompt}[/]{text}", highlight=False)


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="A data file to check.")],
    source: Annotated[
        str | None,
        typer.Option(help="sentiment140 | packaged [default: ingest.source in params.yaml]"),
    ] = None,
    docs: Annotated[Path | None, typer.Option(help="Write Data Docs (HTML) here.")] = None,
) -> None:
    """Check a data drop (ingest + validate) without touching the pipeline; exit 0 if it passes."""
    root = project()
    from upbeat.config import load_params

    with user_errors():
        params = load_params(root / "params.yaml")
        source = source or params.ingest.source
        if source not in ("sentiment140", "packaged"):
            raise fail(f"--source {source!r} is not one of sentiment140, packaged")
        from upbeat.data.check import check_file

        with console.status(f"checking {path}"):
            verdict = check_file(path, source, params, docs_dir=docs)  # type: ignore[arg-type]
    if verdict.get("success"):
        console.print(f"[green]PASS[/] {path} ({source})", highlight=False)
        return
    err.print(
        f"[bold red]FAIL[/] {path} ({source}, at {verdict.get('stage', '?')}):", highlight=False
    )
    err.print(verdict.get("summary", "(no summary)"), highlight=False, markup=False)
    raise typer.Exit(1)


@app.command()
def monitor(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="A drop (file or folder) to check (default: what is new in monitor.folder)."
        ),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Also write the tick's result here as JSON.")
    ] = None,
    event: Annotated[
        bool,
        typer.Option(
            help="On firing, emit the drift event to the Prefect server (PREFECT_API_URL)."
        ),
    ] = True,
) -> None:
    """One drift-watch tick: new tweets and the champion against its training data; prints one
    verdict line. Exit 0: no drift (or drift held back by cooldown/hysteresis, or no new data);
    3: drift that fires a retrain; 1: an error, or every new drop failed validation."""
    root = project()
    from upbeat.config import load_params

    with user_errors():
        params = load_params(root / "params.yaml")
        from upbeat.monitor import tick

        result = tick(root, params, path, log=lambda line: err.print(line, highlight=False))
    if report is not None:
        from upbeat.tracking import write_json

        write_json(report, {**result.__dict__, "payload": result.payload()})
    if result.fired and event:
        from flows.monitor import emit_drift

        sent = emit_drift(root, result.payload())
        if not sent:
            err.print("[dim]PREFECT_API_URL is not set: no drift event emitted[/]")
    console.print(f"monitor: {result.verdict}", highlight=False, soft_wrap=True, markup=False)
    if result.status == "rejected":
        raise typer.Exit(1)
    raise typer.Exit(DRIFT_EXIT if result.fired else 0)


DRIFT_EXIT = 3  # `upbeat monitor`: a tick fired (1 is an error, 2 a usage error)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Open the MLflow UI on the project's store (127.0.0.1 only)."""
    from flows.processes import run_until_stopped
    from upbeat.tracking import artifact_root, tracking_uri

    root = project()
    uri = tracking_uri(root)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",  # one person's UI on a sqlite file: MLflow's default 4 only start slower
    ]
    if artifacts := artifact_root(uri):
        cmd += ["--default-artifact-root", artifacts]
    console.print(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C stops)")
    code = run_until_stopped(cmd, cwd=root)  # SIGTERM/SIGINT stop the server and its workers
    raise typer.Exit(0 if code == 128 + signal.SIGINT else code)


# --- the local team stack --------------------------------------------------------------------

stack_app = typer.Typer(
    help="A local stack of real servers on 127.0.0.1: PostgreSQL, S3 (moto), MLflow, Prefect.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")
StackDir = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Stack folder (default: $UPBEAT_STACK_DIR, else .upbeat-stack/ in the project).",
    ),
]


def _stack_project(folder: Path | None) -> Path:
    """The project the stack belongs to; with an explicit folder, none is needed."""
    import os

    if folder is not None or os.environ.get("UPBEAT_STACK_DIR"):
        return Path.cwd()
    return project()


@stack_app.command("up")
def stack_up(
    folder: StackDir = None,
    s3_port: Annotated[
        int | None,
        typer.Option(help="S3 endpoint port (default: $UPBEAT_STACK_S3_PORT, else 9000)."),
    ] = None,
    mlflow_port: Annotated[
        int | None,
        typer.Option(help="MLflow server port (default: $UPBEAT_STACK_MLFLOW_PORT, else 5001)."),
    ] = None,
    prefect_port: Annotated[
        int | None,
        typer.Option(help="Prefect server port (default: $UPBEAT_STACK_PREFECT_PORT, else 4201)."),
    ] = None,
) -> None:
    """Start the servers that are not running, and wait until each answers."""
    from upbeat import stack

    ports = {"s3": s3_port, "mlflow": mlflow_port, "prefect": prefect_port}
    with user_errors(), console.status("starting the stack"):
        cfg, outcome = stack.up(_stack_project(folder), folder, ports)
    if all(text.startswith("already running") for text in outcome.values()):
        console.print(f"the stack in {cfg.root} is already running", highlight=False)
    for name, text in outcome.items():
        console.print(f"  {name:9} {text}", highlight=False)
    console.print("`upbeat stack status` prints the variables that point a shell at it")


@stack_app.command("down")
def stack_down(folder: StackDir = None) -> None:
    """Stop the servers `upbeat stack up` started (data stays in the stack folder)."""
    from upbeat import stack

    with user_errors(), console.status("stopping the stack"):
        outcome = stack.down(_stack_project(folder), folder)
    for name, text in outcome.items():
        console.print(f"  {name:9} {text}", highlight=False)


@stack_app.command("status")
def stack_status(
    folder: StackDir = None,
    exports: Annotated[
        bool, typer.Option("--exports", help="Print only the export lines (for `eval`).")
    ] = False,
) -> None:
    """What runs where, and the `export` lines that point a shell at it (credentials included)."""
    from upbeat import stack

    root = _stack_project(folder)
    with user_errors():
        lines = stack.exports(root, folder)
        if exports:
            print("\n".join(lines))
            return
        cfg, rows = stack.status(root, folder)
    console.print(f"stack in {cfg.root}", highlight=False)
    for row in rows:
        state = "[green]running[/]" if row["answers"] else "[red]stopped[/]"
        if row["running"] and not row["answers"]:
            state = "[yellow]running, not answering[/]"
        pid = f"pid {row['pid']}" if row["pid"] else ""
        console.print(f"  {row['name']:9} {state} {pid} {row['url']}", highlight=False)
        console.print(f"  {'':9} [dim]data: {row['data']}[/]", highlight=False, soft_wrap=True)
    if lines:
        console.print('# point a shell at the stack: eval "$(upbeat stack status --exports)"')
        print("\n".join(lines))


if __name__ == "__main__":
    app()
