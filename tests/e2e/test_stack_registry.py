"""The shared registry on the local team stack, end to end: real servers on loopback, no fakes.

One stack for the module (stack_fixture). A project copy points at it by each tool's own
configuration only (MLflow's and Prefect's variables, a DVC remote in `.dvc/config`); the real
register and promote stages put a tiny GPT-2 into the server's registry with its model card and
make it champion. Then: `upbeat status` names every server and no secret; the card is on the
server; `mlflow models serve` answers `POST /invocations` from `models:/upbeat-policy@champion`;
`upbeat generate` loads that champion; writes without credentials are refused and write nothing;
no credential lands in anything upbeat wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import stack_fixture
import yaml
from stack_fixture import Stack, free_port, request, s3_keys
from waiting import wait_until

from upbeat import model_card
from upbeat.cli import apply_overrides
from upbeat.stack.config import DVC_BUCKET, MLFLOW_BUCKET

stack = stack_fixture.stack  # one stack for this module
ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
MODEL = "upbeat-policy"  # params.yaml's register.model_name: what `upbeat generate` defaults to
CHAMPION = f"models:/{MODEL}@champion"
CALL_WAIT = 300  # bound on one subprocess (a stage, a CLI command)
SERVE_WAIT = 180  # bound on `mlflow models serve` answering /ping (it downloads the model twice)
PROJECT_PARAMS = [
    "policy.num_threads=1",
    "reward.kind=vader",  # a learned reward model needs its stage's training
    "evaluate.max_new_tokens=4",
    # random tiny weights: the gate's bounds are opened so the first version becomes champion
    "gate.min_judge_delta=-2.0",
    "gate.min_judge_share_delta=-1.0",
    "gate.max_kl=1000.0",
    "gate.min_distinct_2=0.0",
]
METRICS = {
    "eval/n_prompts": 4.0,
    "before/reward_mean": 0.05,
    "after/reward_mean": 0.25,
    "delta/reward_mean": 0.2,
    "delta/reward_mean_ci_low": 0.1,
    "delta/reward_mean_ci_high": 0.3,
    "before/judge_mean": 0.0,
    "after/judge_mean": 0.02,
    "delta/judge_mean": 0.02,
    "delta/judge_mean_ci_low": -0.05,
    "delta/judge_mean_ci_high": 0.09,
    "before/judge_positive_share": 0.25,
    "after/judge_positive_share": 0.5,
    "delta/judge_positive_share": 0.25,
    "after/kl_mean": 1.5,
    "after/distinct_2": 0.6,
}
DATA_MD5 = {"data/raw/tweets.parquet": "5d41402abc4b2a76b9719d911017c592"}


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    """The stack's client variables, and the venv on PATH (as an activated venv has it)."""
    champion: str
    logs: list[str]
    """Everything the stages printed."""

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, *args],
            cwd=self.root,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=CALL_WAIT,
        )
        self.logs += [done.stdout, done.stderr]
        return done

    def upbeat(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return self.run("-m", "upbeat.cli", *args, env=env)

    def stage(self, script: str, *args: str) -> str:
        done = self.run(str(ROOT / "stages" / script), *args)
        assert done.returncode == 0, f"{script}: {done.stdout}\n{done.stderr}"
        return done.stdout


def write_outputs(root: Path, policy: Path) -> None:
    """What the stages before register leave: the PPO policy, evaluate's reports, dvc.lock."""
    from upbeat.config import load_params
    from upbeat.rewards import build_spec, save_spec

    shutil.copytree(policy, root / "models" / "ppo")
    (root / "reports").mkdir()
    save_spec(
        build_spec(load_params(root / "params.yaml").reward), root / "models" / "reward_spec.json"
    )
    (root / "models" / "reward").mkdir()
    (root / "reports" / "reward.json").write_text("{}")
    (root / "reports" / "evaluate.json").write_text(json.dumps(METRICS))
    (root / "reports" / "eval_samples.csv").write_text(
        "prompt,before,after,before_reward,after_reward,before_judge,after_judge,kl\n"
        "i miss my,dog so much,dog thanks so lucky,-0.3,0.8,-0.2,0.1,1.2\n"
    )
    outs = [{"path": path, "md5": md5} for path, md5 in DATA_MD5.items()]
    (root / "dvc.lock").write_text(
        yaml.safe_dump({"schema": "2.0", "stages": {"ingest": {"outs": outs}}})
    )


@pytest.fixture(scope="module")
def project(stack: Stack, tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A project copy on the stack, its policy registered and promoted to champion by the real
    register and promote stages."""
    root = tmp_path_factory.mktemp("project")
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, root / name)
    apply_overrides(root / "params.yaml", PROJECT_PARAMS)
    write_outputs(root, tiny_gpt2)
    env = {**stack.client_env(), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    proj = Project(root, env, "", [])
    for args in (
        ["init", "--no-scm", "-q"],
        ["remote", "add", "-d", "stack", f"s3://{DVC_BUCKET}/store"],
        ["remote", "modify", "stack", "endpointurl", stack.client["AWS_ENDPOINT_URL"]],
    ):
        assert proj.run("-m", "dvc", *args).returncode == 0, proj.logs[-1]

    proj.stage(
        "register.py",
        *("--ppo", "models/ppo", "--evaluate", "reports/evaluate.json"),
        *("--samples", "reports/eval_samples.csv", "--out", "reports/register.json"),
        *("--reward-spec", "models/reward_spec.json", "--reward-model", "models/reward"),
        *("--reward-metrics", "reports/reward.json"),
    )
    proj.stage("promote.py", "--register", "reports/register.json", "--out", "reports/promote.json")
    promoted = json.loads((root / "reports" / "promote.json").read_text())
    assert promoted["passed"], promoted
    proj.champion = promoted["version"]
    return proj


def admin_client(stack: Stack, monkeypatch: pytest.MonkeyPatch):
    from mlflow import MlflowClient

    stack.use(monkeypatch)
    return MlflowClient(stack.client["MLFLOW_TRACKING_URI"])


def secrets(stack: Stack) -> list[str]:
    values = [
        stack.client["MLFLOW_TRACKING_PASSWORD"],
        stack.client["PREFECT_API_AUTH_STRING"].split(":", 1)[1],
        stack.client["AWS_SECRET_ACCESS_KEY"],
    ]
    assert all(len(v) >= 12 for v in values)  # real generated secrets, not empty strings
    return values


def answers(url: str) -> bool:
    try:
        return request(url)[0] == 200
    except OSError:  # nothing listening yet (or any more)
        return False


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


# --- the tests -----------------------------------------------------------------------------------


def test_status_names_every_server_in_use_and_no_secret(stack: Stack, project: Project) -> None:
    # the password also inside the URL (another way MLflow takes it), so masking is shown too
    user, password = (
        stack.client["MLFLOW_TRACKING_USERNAME"],
        stack.client["MLFLOW_TRACKING_PASSWORD"],
    )
    url = stack.client["MLFLOW_TRACKING_URI"]
    in_url = url.replace("://", f"://{user}:{password}@")
    done = project.upbeat(
        "status", env={**project.env, "COLUMNS": "250", "MLFLOW_TRACKING_URI": in_url}
    )
    assert done.returncode == 0, done.stderr
    lines = {ln.split("│")[1].strip(): ln for ln in done.stdout.splitlines() if ln.count("│") > 3}
    masked = url.replace("://", f"://{user}:***@")
    assert masked in lines["tracking"] and "MLFLOW_TRACKING_USERNAME" in lines["tracking"]
    assert masked in lines["registry"]
    assert stack.client["PREFECT_API_URL"] in lines["prefect api"]
    assert "PREFECT_API_AUTH_STRING" in lines["prefect api"]
    assert f"s3://{DVC_BUCKET}/store" in lines["dvc remote"]
    endpoint = stack.client["AWS_ENDPOINT_URL"]
    assert f"core.remote = stack, endpoint {endpoint}" in lines["dvc remote"]
    assert f"{MODEL} v{project.champion}" in done.stdout  # the champion, read from the server
    assert not [s for s in secrets(stack) if s in done.stdout + done.stderr]


def test_the_register_stage_puts_the_model_card_on_the_server_registry(
    stack: Stack, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    client = admin_client(stack, monkeypatch)
    mv = client.get_model_version(MODEL, project.champion)
    card = mlflow.artifacts.load_text(f"models:/{MODEL}/{project.champion}/{model_card.CARD_FILE}")
    assert mv.description == card  # the whole card fits MLflow's description here
    assert card.startswith(f"# {MODEL} version {project.champion}\n")
    assert "| `data/raw/tweets.parquet` | `5d41402abc4b2a76b9719d911017c592` |" in card
    assert "| reward mean | 0.050 | 0.250 | +0.200 [+0.100, +0.300] |" in card
    assert "| i miss my | dog so much | dog thanks so lucky |" in card
    assert "Lexicon-style reward gaming" in card
    assert "`ppo`: learning_rate=" in card and ", steps=150," in card  # the shared keys first
    gate = card.split(model_card.GATE_HEADING, 1)[1].split("\n## ", 1)[0]
    assert "**passed**: made champion" in gate and "champion before: none" in gate
    assert model_card.PENDING not in card
    assert mv.tags["gate.passed"] == "True"
    keys = [k for k in s3_keys(stack, MLFLOW_BUCKET) if k.endswith(model_card.CARD_FILE)]
    assert len(keys) == 1, keys  # stored on the S3 endpoint, through the tracking server


def test_mlflow_models_serve_answers_invocations_from_the_champion(
    stack: Stack, project: Project, tmp_path: Path
) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    serve = [
        str(VENV_BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        CHAMPION,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    proc = subprocess.Popen(
        serve, env=project.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            "answer to /ping from mlflow models serve",
            lambda: answers(f"{url}/ping"),
            SERVE_WAIT,
            1,
            alive=proc,
            output=(tmp_path / "serve.log").read_text,
        )
        body = {
            "dataframe_records": [{"prompt": "i love"}, {"prompt": "so sad"}],
            "params": {"max_new_tokens": 4, "seed": 1},
        }
        code, answer = request(f"{url}/invocations", body=body)
        assert code == 200, answer
        predictions = answer["predictions"]
        assert len(predictions) == 2 and all(isinstance(p, str) and p for p in predictions)
        assert (
            request(
                f"{url}/invocations", body={**body, "params": {"max_new_tokens": 4, "seed": 1}}
            )[1]
            == answer
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
        with contextlib.suppress(AssertionError):
            wait_until("end of the served group", lambda: group_gone(proc.pid), 30, 0.5)
        left = not group_gone(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not left, "a process of `mlflow models serve` outlived SIGTERM to its group"
    assert not answers(f"{url}/ping")


def test_generate_loads_the_champion_from_the_shared_registry(
    stack: Stack, project: Project
) -> None:
    done = project.upbeat(
        "generate", "i love", "-n", "2", "--max-new-tokens", "4", "--model", CHAMPION
    )
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("i love")]
    assert len(lines) == 2, done.stdout
    assert not (project.root / "mlflow").exists()  # nothing went to an embedded store


def test_registry_writes_without_credentials_are_refused_and_write_nothing(
    stack: Stack, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    url = stack.client["MLFLOW_TRACKING_URI"]
    api = f"{url}/api/2.0/mlflow/registered-models"
    alias = {"name": MODEL, "alias": "hijacked", "version": project.champion}
    assert request(f"{api}/create", body={"name": "intruder"})[0] == 401
    assert request(f"{api}/alias", body=alias)[0] == 401
    wrong = (stack.client["MLFLOW_TRACKING_USERNAME"], "not-the-password")
    assert request(f"{api}/alias", wrong, alias)[0] == 401

    stack.use(monkeypatch)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    anonymous = MlflowClient(url)
    with pytest.raises(MlflowException) as refused:
        anonymous.create_registered_model("intruder")
    assert refused.value.get_http_status_code() == 401
    with pytest.raises(MlflowException):
        anonymous.set_registered_model_alias(MODEL, "hijacked", project.champion)
    # upbeat says what to set, once, without a traceback
    env = {k: v for k, v in project.env.items() if not k.startswith("MLFLOW_TRACKING_USER")}
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    done = project.upbeat("promote", project.champion, "--reason", "no credentials", env=env)
    assert done.returncode == 1
    assert "401" in done.stderr and "MLFLOW_TRACKING_USERNAME" in done.stderr
    assert "Traceback" not in done.stderr

    client = admin_client(stack, monkeypatch)
    assert [m.name for m in client.search_registered_models()] == [MODEL]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == project.champion and "hijacked" not in champion.aliases
    assert champion.tags["champion.reason"] != "no credentials"


def test_no_credential_in_run_params_tags_cards_or_anything_upbeat_wrote(
    stack: Stack, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    client = admin_client(stack, monkeypatch)
    written: dict[str, str] = {}
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert {r.data.tags.get("upbeat.stage") for r in runs} >= {"register", "promote"}
    for run in runs:
        written[f"run {run.info.run_id} params"] = json.dumps(run.data.params)
        written[f"run {run.info.run_id} tags"] = json.dumps(run.data.tags)
    written["model tags"] = json.dumps(client.get_registered_model(MODEL).tags)
    for mv in client.search_model_versions(f"name = '{MODEL}'"):
        written[f"version {mv.version}"] = json.dumps({"tags": mv.tags, "d": mv.description})
    uri = f"models:/{MODEL}/{project.champion}"
    written["card"] = mlflow.artifacts.load_text(f"{uri}/{model_card.CARD_FILE}")
    written["MLmodel"] = mlflow.artifacts.load_text(f"{uri}/MLmodel")
    for path in project.root.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".csv", ".yaml", ".lock", ".md", ""}:
            written[str(path)] = path.read_text(errors="replace")
    written["stage and command output"] = "\n".join(project.logs)
    assert len(written) > 8 and len(runs) >= 2
    leaks = [(where, s[:4]) for where, text in written.items() for s in secrets(stack) if s in text]
    assert not leaks, f"a credential was written: {leaks}"
