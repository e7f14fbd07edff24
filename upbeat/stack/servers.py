"""The MLflow tracking server, the Prefect server and a Prefect worker: commands, environments and
the probes that say each one answers.

Secrets travel in the environment of each process (readable only by its owner), never on a
command line, which `ps` and the pid files show.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from upbeat.stack import postgres
from upbeat.stack.clients import client_env
from upbeat.stack.config import (
    HOST,
    MLFLOW_BUCKET,
    MLFLOW_SERVER_ENV,
    REGION,
    WORK_POOL,
    Secrets,
    StackConfig,
    StackError,
)

# Variables a caller's shell may hold that would point a server at another stack.
_FOREIGN = ("MLFLOW_", "PREFECT_", "AWS_")


def base_env() -> dict[str, str]:
    """The caller's environment without MLflow, Prefect and AWS settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN)}


def http_status(url: str, timeout: float = 2) -> int | None:
    """The HTTP status of a GET of `url` (a health probe), None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


# --- MLflow --------------------------------------------------------------------------------------


def mlflow_auth_ini(cfg: StackConfig, sec: Secrets) -> str:
    """MLflow's basic-auth config: users live in PostgreSQL like everything else of the stack.

    The admin password is not in it: MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD when it first
    creates the admin user, and ignores both once the user exists.
    """
    return (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {postgres.url(cfg, 'mlflow_auth')}\n"
        f"admin_username = {sec.mlflow_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # MLflow's own cache of verified credentials: without it every request pays a password
        # hash check (one worker: a password change through the API invalidates it at once).
        "auth_cache_ttl_seconds = 60\n"
    )


def mlflow_command(cfg: StackConfig) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", postgres.url(cfg, "mlflow"),
        "--serve-artifacts",
        "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts",
        "--app-name", "basic-auth",
        "--host", HOST,
        "--port", str(cfg.mlflow_port),
        "--workers", "1",  # a local stack on a small machine; a team server raises it
    ]  # fmt: skip


def write_mlflow_auth_ini(cfg: StackConfig, sec: Secrets) -> None:
    (cfg.root / "mlflow-auth.ini").write_text(mlflow_auth_ini(cfg, sec))


def mlflow_env(cfg: StackConfig, sec: Secrets) -> dict[str, str]:
    return {
        **base_env(),
        "MLFLOW_AUTH_CONFIG_PATH": str(cfg.root / "mlflow-auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": sec.mlflow_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": sec.flask_secret_key,
        **MLFLOW_SERVER_ENV,
        "MLFLOW_S3_ENDPOINT_URL": cfg.s3_url,
        "AWS_ACCESS_KEY_ID": sec.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": sec.aws_secret_access_key,
        "AWS_DEFAULT_REGION": REGION,
    }


def mlflow_ready(cfg: StackConfig) -> bool:
    return http_status(f"{cfg.mlflow_url}/health") == 200


# --- Prefect -------------------------------------------------------------------------------------


def _prefect_common(cfg: StackConfig) -> dict[str, str]:
    return {
        **base_env(),
        # profiles and caches of the stack, not the user's ~/.prefect
        "PREFECT_HOME": str(cfg.root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }


def prefect_command(cfg: StackConfig) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start",
            "--host", HOST, "--port", str(cfg.prefect_port)]  # fmt: skip


def prefect_env(cfg: StackConfig, sec: Secrets) -> dict[str, str]:
    return {
        **_prefect_common(cfg),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres.url(cfg, "prefect", driver="asyncpg"),
        "PREFECT_SERVER_API_AUTH_STRING": sec.prefect_auth,
        # the server's own services call its API too
        "PREFECT_API_AUTH_STRING": sec.prefect_auth,
        # what the UI's /ui-settings tells the browser to call (else Prefect's default 4200)
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(cfg.prefect_port),
        "PREFECT_UI_API_URL": cfg.prefect_api,
    }


def prefect_ready(cfg: StackConfig) -> bool:
    return http_status(f"{cfg.prefect_api}/health") == 200


@contextmanager
def prefect_client(cfg: StackConfig, sec: Secrets) -> Iterator[Any]:
    """Prefect's own (sync) client, pointed at this stack's server with its credentials."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    settings = {PREFECT_API_URL: cfg.prefect_api, PREFECT_API_AUTH_STRING: sec.prefect_auth}
    with temporary_settings(updates=settings), get_client(sync_client=True) as client:
        yield client


def ensure_pool(cfg: StackConfig, sec: Secrets) -> None:
    """Create the process work pool unless it exists."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with prefect_client(cfg, sec) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process"))
        except ObjectAlreadyExists:
            pass
        except Exception as exc:  # the server's refusal, whatever its HTTP status
            raise StackError(f"Prefect refused to create work pool {WORK_POOL!r}: {exc}") from None


def worker_command() -> list[str]:
    return [sys.executable, "-m", "prefect", "worker", "start",
            "--pool", WORK_POOL, "--type", "process", "--name", f"{WORK_POOL}-local"]  # fmt: skip


def worker_env(cfg: StackConfig, sec: Secrets) -> dict[str, str]:
    """The worker's flow runs inherit this: the whole client side of the stack."""
    return {
        **_prefect_common(cfg),
        **client_env(cfg, sec),
        # A local server: poll every 2 s (Prefect's default 10 s is most of a triggered no-op
        # run's wait; benchmarks/README.md "Stack").
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        # With PostgreSQL down, Prefect's server answers 500 (not its retryable 503) to what
        # needs the database: a run's client retries those too (5 times, 2+4+...+32 s), so a
        # database restart of up to a minute passes under a run
        "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
    }


def online_workers(cfg: StackConfig, sec: Secrets) -> list[Any]:
    """Workers of the pool that Prefect counts as online (they heartbeat while polling)."""
    from prefect.client.schemas.objects import WorkerStatus

    with prefect_client(cfg, sec) as client:
        found = client.read_workers_for_work_pool(WORK_POOL)
    return [w for w in found if w.status == WorkerStatus.ONLINE]
