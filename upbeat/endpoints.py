"""Which servers upbeat talks to, read from each tool's own configuration (for `upbeat status`).

Nothing here keeps a second copy: MLflow's variables (`MLFLOW_TRACKING_URI`, `MLFLOW_REGISTRY_URI`),
Prefect's settings (`PREFECT_API_URL` from the environment or the active Prefect profile), and
DVC's merged config (`.dvc/config`, `.dvc/config.local`, global, system), asked of DVC itself.
No credential is ever returned: URLs go through `redact`, and auth is reported by the name of the
variable that holds it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from upbeat.tracking import redact, registry_uri, tracking_uri

# Runs in a subprocess so that DVC resolves and merges its config levels exactly as `dvc` would.
_DVC_REMOTE = """
import json
from dvc.config import Config
cfg = Config.from_cwd(validate=False)
remotes = {
    name: {k: body[k] for k in ("url", "endpointurl") if k in body}
    for name, body in cfg.get("remote", {}).items()
}
print(json.dumps({"default": cfg.get("core", {}).get("remote"), "remotes": remotes}))
"""


@dataclass(frozen=True)
class Endpoint:
    """One server upbeat uses (or what it does without one)."""

    role: str
    where: str
    """A URL with any password masked, or what happens when nothing is configured."""
    note: str = ""
    """Where the setting came from and how it authenticates (variable names, never values)."""


def mlflow_endpoints(root: Path) -> list[Endpoint]:
    """The tracking store and the model registry."""
    auth = [
        name
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN")
        if os.environ.get(name)
    ]
    how = f"; credentials from {', '.join(auth)}" if auth else "; no credentials set"
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        how = how if uri.startswith(("http://", "https://")) else ""  # only a server asks for them
        tracking = Endpoint("tracking", redact(uri), f"MLFLOW_TRACKING_URI{how}")
    else:
        tracking = Endpoint("tracking", tracking_uri(root), "embedded: MLFLOW_TRACKING_URI unset")
    if os.environ.get("MLFLOW_REGISTRY_URI"):
        registry = Endpoint("registry", redact(registry_uri(root)), "MLFLOW_REGISTRY_URI")
    else:
        registry = Endpoint(
            "registry", tracking.where, "the tracking store (MLFLOW_REGISTRY_URI unset)"
        )
    return [tracking, registry]


def prefect_endpoint() -> Endpoint:
    """The Prefect API: a server whose workers run deployments, or a temporary one per run."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return Endpoint(
            "prefect api", "a temporary server for each `upbeat run`", "PREFECT_API_URL unset"
        )
    auth = [s.name for s in (PREFECT_API_AUTH_STRING, PREFECT_API_KEY) if s.value()]
    how = f"credentials from {', '.join(auth)}" if auth else "no credentials set"
    return Endpoint("prefect api", redact(url), f"PREFECT_API_URL; {how}")


def dvc_remote(root: Path) -> Endpoint:
    """DVC's default remote, where `dvc push` stores data and models."""
    done = subprocess.run(
        [sys.executable, "-c", _DVC_REMOTE], cwd=root, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Endpoint("dvc remote", "unknown", f"DVC could not read its config: {last}")
    cfg = json.loads(done.stdout)
    name, remotes = cfg["default"], cfg["remotes"]
    if not name:
        others = f" ({', '.join(sorted(remotes))} configured, none default)" if remotes else ""
        return Endpoint(
            "dvc remote",
            "none: outputs stay in the local cache",
            f"no core.remote in .dvc/config or config.local{others}",
        )
    body = remotes.get(name, {})
    url = redact(body.get("url", f"? (remote {name!r} is not defined)"))
    extra = f", endpoint {redact(body['endpointurl'])}" if "endpointurl" in body else ""
    return Endpoint("dvc remote", url, f"core.remote = {name}{extra}")


def in_use(root: Path) -> list[Endpoint]:
    """Every server upbeat would talk to from `root`, in pipeline order."""
    return [*mlflow_endpoints(root), prefect_endpoint(), dvc_remote(root)]
