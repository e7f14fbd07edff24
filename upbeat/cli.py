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

from flows.deploy import MONITOR_CRON, RETRAIN_CRON  # plain constants: no Prefect import

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


# --- --set and profiles, written into params.yaml ----------------------------------------------


def write_params(params_file: Path, values: dict[str, Any], source: str) -> list[str]:
    """Validate dotted `key: value`s against the schema, then write them into params.yaml, its
    formatting kept (comments, order, quotes, `null`, long lines). Nothing is written if any is
    invalid. Returns the keys written."""
    from ruamel.yaml import YAML

    from upbeat.config import (
        key_path,
        read_params_file,
        set_dotted,
        validate_params,
        with_overrides,
    )
    from upbeat.files import replacing

    validate_params(with_overrides(read_params_file(params_file), values), source)
    yaml = YAML()  # round-trip mode: comments, order and quoting survive
    yaml.preserve_quotes = True
    yaml.width = 4096  # never wrap a long value (a URL) onto a second line
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    doc = yaml.load(params_file.read_text(encoding="utf-8"))
    for key, value in values.items():
        set_dotted(doc, key_path(key), value)
    with replacing(params_file) as tmp, tmp.open("w", encoding="utf-8") as f:
        yaml.dump(doc, f)
    return list(values)


def apply_overrides(params_file: Path, items: list[str]) -> list[str]:
    """`--set key=value ...`: written into params.yaml, as `dvc exp run -S` does, so DVC hashes
    the value the stages read and `git diff params.yaml` shows what the run used."""
    from upbeat.config import parse_override

    values = dict(parse_override(item) for item in items)
    return write_params(params_file, values, f"{params_file} with --set {' '.join(items)}")


def apply_profile(params_file: Path, name: str) -> list[str]:
    """Write profile `name`'s values into the blocks of params.yaml (a named `--set`)."""
    from upbeat.config import profile_values, read_params_file

    values = profile_values(read_params_file(params_file), name)
    return write_params(params_file, values, f"{params_file} with profile {name}")


# --- commands ------------------------------------------------------------------------------------


@app.command()
def run(
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-S",
            help="Write a parameter into params.yaml first, e.g. --set ppo.steps=10 (repeatable; "
            "as `dvc exp run -S`).",
        ),
    ] = None,
    profile_: Annotated[
        str | None,
        typer.Option(
            "--profile", help="Write a profile's values into params.yaml first (before --set)."
        ),
    ] = None,
    lock_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for another run to finish (0: refuse at once).")
    ] = 0,
) -> None:
    """Run the pipeline through the Prefect flow (DVC skips what is up to date)."""
    root = project()
    with user_errors():
        if profile_:
            apply_profile(root / "params.yaml", profile_)
            console.print(f"params.yaml: profile {profile_} applied")
        if set_:
            written = apply_overrides(root / "params.yaml", set_)
            console.print(f"params.yaml: set {', '.join(written)}")
        from upbeat.config import load_params

        load_params(root / "params.yaml")  # fail here, not three stages in
    from flows.pipeline import PlanError
    from flows.processes import Stopped
    from flows.run import LockHeld, PushFailed, StageFailed
    from flows.run import run as run_pipeline

    def through_prefect(project: Path, planned: Any) -> dict[str, str]:
        from flows.retrain import through_prefect  # Prefect: only a stage to run needs it

        return through_prefect(project, planned)

    try:
        results = run_pipeline(root, lock_timeout=lock_timeout, through=through_prefect)
    except (LockHeld, PlanError) as exc:
        raise fail(str(exc)) from None
    except StageFailed as exc:
        raise fail(
            str(exc),
            "fix the cause and run `upbeat run` again: finished stages are kept and skipped, the "
            "champion model is unchanged",
        ) from None
    except PushFailed as exc:
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
def profile(
    name: Annotated[str | None, typer.Argument(help="Profile to apply (none: show them).")] = None,
) -> None:
    """Write a profile's values into params.yaml's blocks, or show which profile they match."""
    from upbeat.config import applied_profiles, read_params_file

    params_file = project() / "params.yaml"
    with user_errors():
        if name is not None:
            written = apply_profile(params_file, name)
            console.print(f"params.yaml: profile {name} applied ({', '.join(written)})")
            return
        raw = read_params_file(params_file)
        applied = applied_profiles(raw)
        for known in raw.get("profiles") or {}:
            console.print(f"{'*' if known in applied else ' '} {known}", highlight=False)
        if not applied:
            console.print("(the blocks match no profile: a --set or an edit changed one's key)")


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="Cron schedule (server time zone).")] = RETRAIN_CRON,
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
    from flows.processes import interrupt_on_sigterm, prefect_api
    from flows.retrain import serve as serve_flow

    # SIGTERM stops serving like Ctrl-C; a temporary server is stopped with it, never orphaned.
    with contextlib.suppress(KeyboardInterrupt), interrupt_on_sigterm(), prefect_api():
        serve_flow(str(root), cron=cron, name=name)


@app.command()
def deploy(
    cron: Annotated[
        str | None, typer.Option(help="Cron schedule, in UTC (none: runs only when triggered).")
    ] = RETRAIN_CRON,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "scheduled",
    pool: Annotated[
        str, typer.Option(help="Work pool whose workers run it (the local stack's: upbeat).")
    ] = "upbeat",
    monitor_cron: Annotated[
        str, typer.Option(help="The drift monitor's schedule, in UTC ('': no monitor).")
    ] = MONITOR_CRON,
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
                title=f"champion: {info['model']} v{champ['version']} ({champ['how']}; "
                f"reward {champ['reward']})",
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
                "version",
                "aliases",
                "gate passed",
                "reward",
                "registered",
                title="latest versions",
            )
            for v in info["versions"]:
                versions.add_row(
                    v["version"],
                    ", ".join(v["aliases"]),
                    v["gate"],
                    v["reward"],
                    v["registered_at"],
                )
            console.print(versions)
        from upbeat.config import load_params

        reward_name = load_params(root / "params.yaml").register.reward_model_name
        if found_rewards := registry.reward_versions(reward_name):
            rewards = Table(
                "version",
                "held-out AUC",
                "human AUC",
                "training data md5",
                "registered",
                title=f"reward model {reward_name}",
            )
            for v in found_rewards:
                auc, human = v["metrics"].get("reward/roc_auc"), v["metrics"].get("human/roc_auc")
                rewards.add_row(
                    v["version"],
                    "-" if auc is None else f"{auc:.3f}",
                    "-" if human is None else f"{human:.3f}",
                    v["train_data_md5"],
                    v["registered_at"],
                )
            console.print(rewards)


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
        typer.Option(help="sentiment140 | packaged [default: what its first row shows]"),
    ] = None,
    docs: Annotated[Path | None, typer.Option(help="Write Data Docs (HTML) here.")] = None,
) -> None:
    """Check a data drop (ingest + validate) without touching the pipeline; exit 0 if it passes."""
    root = project()
    from upbeat.config import load_params

    with user_errors():
        from upbeat.data.sources import drop_source

        params = load_params(root / "params.yaml")
        if source is None:  # as ingest reads a drop
            source = drop_source(path, "auto") if path.is_file() else params.ingest.source
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
    from upbeat.errors import DRIFT_EXIT

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


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Open the MLflow UI on the project's store (127.0.0.1 only)."""
    import os

    from flows.processes import run_until_stopped
    from upbeat.stack.config import MLFLOW_SERVER_ENV
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
    env = {**os.environ, **MLFLOW_SERVER_ENV}
    code = run_until_stopped(cmd, cwd=root, env=env)  # SIGTERM/SIGINT stop it and its workers
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
def stack_down(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Only these servers (postgres, s3, mlflow, prefect, worker)."),
    ] = None,
    folder: StackDir = None,
    force: Annotated[
        bool, typer.Option("--force", help="Cancel the flow runs in progress first.")
    ] = False,
) -> None:
    """Stop the servers `upbeat stack up` started (data stays in the stack folder); `up` starts
    again whatever is stopped. Refuses while a flow run is in progress, unless --force."""
    from upbeat import stack

    with user_errors(), console.status("stopping the stack"):
        outcome = stack.down(_stack_project(folder), folder, names, force)
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
    if not any(row["running"] for row in rows):
        for other in stack.elsewhere(cfg):
            console.print(
                f"[yellow]nothing runs from {cfg.root}, but a stack runs in {other}:[/] "
                f"`export UPBEAT_STACK_DIR={other}` (or --dir) to use it",
                highlight=False,
                soft_wrap=True,
            )
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


# --- human feedback: the rating page ---------------------------------------------------------

feedback_app = typer.Typer(
    help="Human feedback: a rating page for pairs of the champion's continuations "
    "(docs/feedback.md). Without a command: serve the page.",
)
app.add_typer(feedback_app, name="feedback")


def _feedback_store() -> Any:
    from upbeat.feedback.store import Store, database_url

    with user_errors():
        return Store(database_url(project()))


@feedback_app.callback(invoke_without_command=True)
def feedback_default(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        feedback_serve()


@feedback_app.command("serve")
def feedback_serve(
    host: Annotated[
        str, typer.Option(help="Address to bind (loopback unless told).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8765,
    votes_per_minute: Annotated[float, typer.Option(help="Rate limit per rater.", min=1)] = 60,
    burst: Annotated[int, typer.Option(help="Votes a rater may send at once.", min=1)] = 10,
) -> None:
    """Serve the rating page (Ctrl-C stops); votes go to $UPBEAT_FEEDBACK_DB or the project's
    feedback/feedback.db."""
    from upbeat.feedback.app import serve as serve_page

    store = _feedback_store()
    console.print(f"rating page on http://{host}:{port} (votes: {store.where}; Ctrl-C stops)")
    with contextlib.suppress(KeyboardInterrupt):
        serve_page(store, host, port, votes_per_minute=votes_per_minute, burst=burst)


@feedback_app.command("add-rater")
def feedback_add_rater(
    name: Annotated[str, typer.Argument(help="The rater's name (unique).")],
) -> None:
    """Create a rater and print their login token (shown once; only its hash is stored)."""
    store = _feedback_store()
    with user_errors():
        token = store.add_rater(name)
    err.print(f"rater {name!r} added to {store.where}; their token (shown once):", highlight=False)
    print(token)


@feedback_app.command("generate")
def feedback_generate(
    pairs: Annotated[int, typer.Option("--pairs", "-n", help="Pairs to add.", min=1)] = 64,
    candidates: Annotated[
        int, typer.Option(help="Candidates sampled per pair added (the rest not shown).", min=1)
    ] = 4,
    strategy: Annotated[
        str, typer.Option(help="gap (reward least sure) | disagree (reward vs judge) | random")
    ] = "gap",
    seed: int = 0,
    model: Annotated[
        str | None,
        typer.Option(help="models:/... or a policy directory [default: the champion]"),
    ] = None,
    challenger: Annotated[
        bool, typer.Option(help="Champion vs challenger when one exists (else two samples).")
    ] = True,
) -> None:
    """Sample pairs from the champion in batch and store the most informative for rating."""
    root = project()
    from upbeat.config import dvc_vars, load_params
    from upbeat.feedback.pairs import STRATEGIES, generate

    if strategy not in STRATEGIES:
        raise fail(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    store = _feedback_store()
    with user_errors():
        params = load_params(root / "params.yaml")
        paths = dvc_vars(root)  # the pipeline's paths, as dvc.yaml states them
        with console.status("sampling and scoring candidate pairs"):
            rows = generate(
                params,
                str(root / paths["eval"]),
                str(root / paths["reward_spec"]),
                n_pairs=pairs,
                candidates=candidates,
                strategy=strategy,  # type: ignore[arg-type]
                seed=seed,
                model=model,
                challenger=challenger,
            )
        ids = store.add_pairs(rows)
    models = sorted({r["model_a"] for r in rows} | {r["model_b"] for r in rows})
    console.print(
        f"added {len(ids)} pairs ({strategy}) from {', '.join(models) or '-'} to {store.where}",
        highlight=False,
        soft_wrap=True,
    )


@feedback_app.command("simulate")
def feedback_simulate(
    token: Annotated[str, typer.Option(help="The simulated rater's token (add-rater).")],
    url: Annotated[str, typer.Option(help="The rating page.")] = "http://127.0.0.1:8765",
    gold: Annotated[
        str,
        typer.Option(help="The stand-in person: lexicon | vader | hf:<model> (not the reward)."),
    ] = "lexicon",
    votes: Annotated[int, typer.Option(help="Pairs to answer at most.", min=1)] = 100,
    margin: Annotated[float, typer.Option(help="Score difference below which it says tie.")] = 0.05,
) -> None:
    """A simulated rater: a scorer the policy never trained against votes through the page."""
    root = project()
    from upbeat.config import dvc_vars
    from upbeat.feedback.simulate import rate
    from upbeat.judge import load_judge
    from upbeat.rewards import load_spec

    with user_errors():
        spec = load_spec(root / dvc_vars(root)["reward_spec"])
        with console.status(f"loading {gold}"):
            scorer = load_judge(gold, spec)  # refuses the reward's own scorer
        given = rate(url, token, scorer, votes=votes, margin=margin)
    console.print(f"answered {sum(given.values())} pairs: {dict(given)}", highlight=False)


@feedback_app.command("export")
def feedback_export() -> None:
    """Write the votes to the file the `feedback` stage depends on (unchanged bytes when no vote
    is new, so DVC re-runs nothing); the flow runs this before it plans."""
    root = project()
    from upbeat.feedback.store import export_for_run

    with user_errors():
        if (done := export_for_run(root)) is None:
            raise fail("dvc.yaml names no `feedback_votes` path: no feedback stage here")
        out, changed, n = done
    what = "updated" if changed else "unchanged"
    console.print(f"{out.relative_to(root)}: {n} votes ({what})", highlight=False)


if __name__ == "__main__":
    app()
