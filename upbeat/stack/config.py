"""Where the local stack lives, which loopback ports it uses, and its generated credentials.

Ports come from, in order: an explicit option, an `UPBEAT_STACK_<NAME>_PORT` variable, the ports
the stack last ran on (`stack.json`), the defaults (chosen not to collide with MLflow's 5000 and
Prefect's 4200). Credentials are generated once into `secrets.json` (mode 0600) and reach the
servers through their environment only: never a command line, a log or a pid file.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from dataclasses import dataclass, fields
from pathlib import Path

from upbeat.errors import UpbeatError

HOST = "127.0.0.1"
DIR_ENV = "UPBEAT_STACK_DIR"
DEFAULT_DIR = ".upbeat-stack"
DEFAULT_PORTS = {"s3": 9000, "mlflow": 5001, "prefect": 4201}
WORK_POOL = "upbeat"
MLFLOW_BUCKET = "upbeat-mlflow"
DVC_BUCKET = "upbeat-dvc"
REGION = "us-east-1"
# upbeat's MLflow servers (the stack's, `upbeat ui`) run no server-side jobs (GenAI evaluation,
# trace rollups): without them MLflow starts no job-runner process and answers sooner.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class StackError(UpbeatError):
    """The local stack cannot start, stop or be reached; the message says which server and why."""


def port_env(name: str) -> str:
    return f"UPBEAT_STACK_{name.upper()}_PORT"


@dataclass(frozen=True)
class StackConfig:
    """One stack: its folder and the loopback ports of its network servers."""

    root: Path
    """The stack folder: data, logs, pid files and secrets."""
    s3_port: int
    """moto's S3 endpoint."""
    mlflow_port: int
    """The MLflow tracking server (UI, REST API, proxied artifacts)."""
    prefect_port: int
    """The Prefect server (UI and API)."""

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    def ports(self) -> dict[str, int]:
        return {"s3": self.s3_port, "mlflow": self.mlflow_port, "prefect": self.prefect_port}

    def with_ports(self, ports: dict[str, int]) -> StackConfig:
        return StackConfig(self.root, *(ports[name] for name in DEFAULT_PORTS))

    def save(self) -> None:
        """Remember the ports, so a later `up`, `status` or `down` finds the same stack."""
        (self.root / "stack.json").write_text(json.dumps(self.ports(), indent=2) + "\n")


def resolve(
    project: Path, root: Path | None = None, ports: dict[str, int | None] | None = None
) -> StackConfig:
    """The stack of `project`, in `root`, `$UPBEAT_STACK_DIR` or `<project>/.upbeat-stack`."""
    folder = Path(root or os.environ.get(DIR_ENV) or project / DEFAULT_DIR).resolve()
    saved_file = folder / "stack.json"
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    chosen: dict[str, int] = {}
    for name, default in DEFAULT_PORTS.items():
        explicit = (ports or {}).get(name)
        raw = explicit or os.environ.get(port_env(name)) or saved.get(name) or default
        try:
            chosen[name] = int(raw)
        except ValueError:
            raise StackError(f"{port_env(name)}={raw!r} is not a port number") from None
        if not 0 < chosen[name] < 65536:
            raise StackError(f"port {chosen[name]} for {name} is out of range (1-65535)")
    return StackConfig(folder, *(chosen[name] for name in DEFAULT_PORTS))


@dataclass(frozen=True)
class Secrets:
    """Credentials generated for this stack, each checked by the server it is for."""

    mlflow_username: str
    mlflow_password: str
    flask_secret_key: str
    """Signs MLflow's CSRF tokens (the basic-auth app refuses to start without one)."""
    prefect_username: str
    prefect_password: str
    aws_access_key_id: str
    aws_secret_access_key: str

    @property
    def prefect_auth(self) -> str:
        return f"{self.prefect_username}:{self.prefect_password}"

    def values(self) -> list[str]:
        """Every secret value (the tests look for these in logs and expect none)."""
        return [
            self.mlflow_password,
            self.flask_secret_key,
            self.prefect_password,
            self.aws_secret_access_key,
        ]


def _generate() -> Secrets:
    upper = string.ascii_uppercase + string.digits
    return Secrets(
        mlflow_username="admin",
        mlflow_password=secrets.token_urlsafe(24),
        flask_secret_key=secrets.token_hex(32),
        prefect_username="admin",
        prefect_password=secrets.token_urlsafe(24),
        aws_access_key_id="AKIA" + "".join(secrets.choice(upper) for _ in range(16)),
        aws_secret_access_key=secrets.token_urlsafe(30),
    )


def load_secrets(cfg: StackConfig, create: bool = False) -> Secrets | None:
    """The stack's credentials; generated on first use when `create` (file mode 0600)."""
    path = cfg.root / "secrets.json"
    if path.is_file():
        data = json.loads(path.read_text())
        try:
            return Secrets(**{f.name: data[f.name] for f in fields(Secrets)})
        except KeyError as exc:
            raise StackError(
                f"{path} lacks {exc.args[0]!r}: delete the file and run `upbeat stack up` again "
                "(the servers' data stays, but MLflow's admin password was set on first start: "
                "delete the stack folder to start afresh)"
            ) from None
    if not create:
        return None
    fresh = _generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({f.name: getattr(fresh, f.name) for f in fields(Secrets)}, f, indent=2)
    return fresh
