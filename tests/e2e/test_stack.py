"""`upbeat stack`: the local team stack's real servers on loopback, end to end.

One stack for the module, in a fresh folder on free ports, driven through the CLI as a user
would (`upbeat stack up | status | down` in subprocesses, so the servers really outlive the
command that started them). The fixture always brings it down and then checks that no process
named in its pid files is alive. Every client talks to a server process over HTTP or the
PostgreSQL socket: MLflow through its REST API with basic auth, artifacts and the DVC remote on
moto's S3 server (signatures enforced), Prefect through its API.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import stack_fixture
from stack_fixture import CLI, Stack, free_port, request, s3_keys, stack_env
from tiny_project import git

from upbeat.stack import NAMES, WORK_POOL
from upbeat.stack.config import DVC_BUCKET, MLFLOW_BUCKET
from upbeat.stack.procs import alive, read_record

MODEL = "stack-e2e-policy"
stack = stack_fixture.stack  # one stack for this module


@pytest.fixture(scope="module")
def registered(stack: Stack, tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run with an artifact, and a registered policy version made champion, via the server."""
    import mlflow

    from upbeat import registry

    note = tmp_path_factory.mktemp("artifact") / "note.txt"
    note.write_text("logged through the tracking server")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in stack.client.items():
            mp.setenv(key, value)
        mlflow.set_tracking_uri(stack.client["MLFLOW_TRACKING_URI"])
        exp_id = mlflow.create_experiment("stack-e2e")
        with mlflow.start_run(experiment_id=exp_id) as run:
            mlflow.log_param("answer", 42)
            mlflow.log_metric("eval/score", 0.5)
            mlflow.log_artifact(str(note))
        version = registry.register_policy(tiny_gpt2, MODEL, {"eval/score": 0.5})
        registry.promote(MODEL, version, "stack e2e")
    return {"run_id": run.info.run_id, "version": version}


@pytest.fixture(scope="module")
def dvc_repo(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny git + DVC repo whose default remote is the stack's bucket; its data pushed."""
    repo = tmp_path_factory.mktemp("dvc-origin")
    env = stack.client_env()

    def dvc(*args: str, cwd: Path = repo) -> None:
        subprocess.run(
            [sys.executable, "-m", "dvc", *args],
            cwd=cwd,
            env=env,
            check=True,
            timeout=300,
            capture_output=True,
        )

    git(repo, "init", "-q")
    dvc("init", "-q")
    (repo / "data.csv").write_text("text,label\ngood day,1\nbad day,0\n")
    dvc("add", "data.csv")
    dvc("remote", "add", "-d", "stack", f"s3://{DVC_BUCKET}/store")
    dvc("remote", "modify", "stack", "endpointurl", stack.client["AWS_ENDPOINT_URL"])
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "data")
    dvc("push")
    return repo


def pull_in_fresh_clone(st: Stack, origin: Path, into: Path) -> str:
    """`git clone` + `dvc pull` with an empty cache; returns the pulled data."""
    git(into.parent, "clone", "-q", str(origin), into.name)
    assert not (into / ".dvc" / "cache").exists()
    subprocess.run(
        [sys.executable, "-m", "dvc", "pull"],
        cwd=into,
        env=st.client_env(),
        check=True,
        timeout=300,
        capture_output=True,
    )
    return (into / "data.csv").read_text()


# --- the tests -----------------------------------------------------------------------------------


def test_status_shows_every_server_and_the_exports(stack: Stack) -> None:
    out = stack.cli("status").stdout
    for name in NAMES:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        assert "running" in line and "not answering" not in line, line
    assert stack.client["MLFLOW_TRACKING_URI"] in out
    assert set(stack.client) >= {
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "PREFECT_API_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
    }
    assert stack.client["MLFLOW_TRACKING_URI"].endswith(f":{stack.env['UPBEAT_STACK_MLFLOW_PORT']}")


def test_a_second_up_says_it_is_running(stack: Stack) -> None:
    pids = {r.name: r.pid for r in stack.seen}
    out = stack.cli("up").stdout
    assert "already running" in out
    assert {n: read_record(stack.root / "run", n).pid for n in NAMES} == pids  # type: ignore[union-attr]


def test_a_port_in_use_is_named_and_nothing_starts(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        root = tmp_path / "other-stack"
        ports = {"s3": free_port(), "mlflow": taken, "prefect": free_port()}
        done = subprocess.run(
            [*CLI, "up"], env=stack_env(root, ports), capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1
    assert f"port {taken}" in done.stderr and "in use" in done.stderr
    assert "--mlflow-port" in done.stderr and "UPBEAT_STACK_MLFLOW_PORT" in done.stderr
    assert not list((root / "run").glob("*.pid")), "a server started despite the port error"


def test_mlflow_without_credentials_gets_401_and_writes_nothing(stack: Stack) -> None:
    url = stack.client["MLFLOW_TRACKING_URI"]
    admin = (stack.client["MLFLOW_TRACKING_USERNAME"], stack.client["MLFLOW_TRACKING_PASSWORD"])
    create = f"{url}/api/2.0/mlflow/experiments/create"
    assert request(create, body={"name": "anonymous"})[0] == 401
    assert request(create, ("admin", "wrong-password"), {"name": "anonymous"})[0] == 401
    found = f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=anonymous"
    assert request(found, admin)[0] == 404  # the refused request wrote nothing


def test_mlflow_run_artifact_and_registry_through_the_server(
    stack: Stack, registered: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from upbeat.models import load_policy
    from upbeat.registry import download_policy

    for key, value in stack.client.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(stack.client["MLFLOW_TRACKING_URI"])
    run = client.get_run(registered["run_id"])
    assert run.data.params == {"answer": "42"}
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    keys = s3_keys(stack, MLFLOW_BUCKET)
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
    assert any(k.endswith(".safetensors") for k in keys)  # the registered policy's weights

    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == registered["version"]
    policy, tokenizer = load_policy(str(download_policy(f"models:/{MODEL}@champion")))
    assert policy.config.vocab_size == len(tokenizer)


def test_s3_refuses_unsigned_and_wrongly_signed_requests_and_writes_nothing(
    stack: Stack, dvc_repo: Path
) -> None:
    import boto3
    from botocore.exceptions import ClientError

    endpoint = stack.client["AWS_ENDPOINT_URL"]
    key, secret = stack.client["AWS_ACCESS_KEY_ID"], stack.client["AWS_SECRET_ACCESS_KEY"]
    assert request(f"{endpoint}/{DVC_BUCKET}")[0] == 403  # anonymous listing
    assert request(f"{endpoint}/{DVC_BUCKET}/intruder", body={})[0] == 403  # anonymous write
    assert request(f"{endpoint}/moto-api/data.json")[0] == 403  # moto's dump of every backend

    def s3_as(key_id: str, secret_key: str):  # type: ignore[no-untyped-def]
        return boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=stack.client["AWS_DEFAULT_REGION"],
            aws_access_key_id=key_id,
            aws_secret_access_key=secret_key,
        )

    for intruder, code in (
        (s3_as(key, secret[::-1]), "SignatureDoesNotMatch"),
        (s3_as("AKIA" + "X" * 16, secret), "InvalidAccessKeyId"),
    ):
        for call, args in (
            ("list_objects_v2", {"Bucket": DVC_BUCKET}),
            ("get_object", {"Bucket": MLFLOW_BUCKET, "Key": "anything"}),
            ("put_object", {"Bucket": DVC_BUCKET, "Key": "intruder", "Body": b"x"}),
            ("create_bucket", {"Bucket": "intruder"}),
        ):
            with pytest.raises(ClientError) as refused:
                getattr(intruder, call)(**args)
            error = refused.value.response
            assert error["ResponseMetadata"]["HTTPStatusCode"] == 403, call
            assert error["Error"]["Code"] == code, call
    # presigned URLs (MLflow's server hands them out for downloads): the key's, and unexpired
    from botocore.config import Config

    def presigned(secret_key: str, expires: int = 60) -> str:
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=stack.client["AWS_DEFAULT_REGION"],
            aws_access_key_id=key, aws_secret_access_key=secret_key,
            config=Config(signature_version="s3v4"),
        )  # fmt: skip
        where = {"Bucket": DVC_BUCKET, "Key": "presigned.txt"}
        return client.generate_presigned_url("get_object", Params=where, ExpiresIn=expires)

    s3_as(key, secret).put_object(Bucket=DVC_BUCKET, Key="presigned.txt", Body=b"shared")
    assert request(presigned(secret)) == (200, b"shared")
    assert request(presigned(secret).replace("Signature=", "Signature=0"))[0] == 403
    assert request(presigned(secret[::-1]))[0] == 403
    expired = presigned(secret, expires=1)
    time.sleep(2)
    assert request(expired)[0] == 403
    # the stack's key: allowed S3 and nothing else of moto (its IAM holds that key)
    iam = boto3.client(
        "iam", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=key, aws_secret_access_key=secret,
    )  # fmt: skip
    with pytest.raises(ClientError):
        iam.list_access_keys()
    keys = s3_keys(stack, DVC_BUCKET)
    assert "intruder" not in keys and any(k.startswith("store/") for k in keys)
    s3_as(key, secret).delete_object(Bucket=DVC_BUCKET, Key="presigned.txt")
    assert [b["Name"] for b in s3_as(key, secret).list_buckets()["Buckets"]] == [
        MLFLOW_BUCKET,
        DVC_BUCKET,
    ]


def test_prefect_server_work_pool_and_an_online_worker(stack: Stack) -> None:
    api = stack.client["PREFECT_API_URL"]
    auth = tuple(stack.client["PREFECT_API_AUTH_STRING"].split(":", 1))
    assert request(f"{api}/health")[0] == 200
    assert request(f"{api}/work_pools/{WORK_POOL}")[0] == 401  # no credentials
    code, pool = request(f"{api}/work_pools/{WORK_POOL}", auth)  # type: ignore[arg-type]
    assert code == 200 and pool["type"] == "process"
    code, workers = request(f"{api}/work_pools/{WORK_POOL}/workers/filter", auth, {})  # type: ignore[arg-type]
    assert code == 200
    assert [w["status"] for w in workers] == ["ONLINE"], workers


def test_dvc_push_then_pull_into_a_fresh_clone(
    stack: Stack, dvc_repo: Path, tmp_path: Path
) -> None:
    assert any(k.startswith("store/") for k in s3_keys(stack, DVC_BUCKET))
    pulled = pull_in_fresh_clone(stack, dvc_repo, tmp_path / "clone")
    assert pulled == (dvc_repo / "data.csv").read_text()


def test_a_second_checkout_is_told_where_the_running_stack_is(stack: Stack, tmp_path: Path) -> None:
    env = {**stack.env, "UPBEAT_STACK_DIR": str(tmp_path / "this-checkout" / ".upbeat-stack")}
    done = subprocess.run(
        [*CLI, "status"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert f"a stack runs in {stack.root}: `export UPBEAT_STACK_DIR={stack.root}`" in out


def test_down_one_server_then_up_starts_just_it_again(stack: Stack, dvc_repo: Path) -> None:
    before = {r.name: r for n in NAMES if (r := read_record(stack.root / "run", n))}
    stored = s3_keys(stack, DVC_BUCKET)
    down = stack.cli("down", "s3").stdout
    assert "s3" in down and "objects kept" in down and "mlflow" not in down
    assert not alive(before["s3"])
    assert all(alive(rec) for name, rec in before.items() if name != "s3")
    out = stack.up().stdout
    assert re.search(r"s3 +started", out) and re.search(r"mlflow +already running", out)
    assert s3_keys(stack, DVC_BUCKET) == stored


def test_down_then_up_keeps_registry_artifacts_and_dvc_data(
    stack: Stack, registered: dict, dvc_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from upbeat.registry import download_policy

    before = list(stack.seen)
    down = stack.cli("down").stdout
    assert "objects kept" in down
    assert (stack.root / "s3").stat().st_mode & 0o777 == 0o700  # the buckets' copy: owner only
    assert not [r for r in before if alive(r)], "down left a server running"
    assert not list((stack.root / "run").glob("*.pid"))
    stack.up()

    for key, value in stack.client.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(stack.client["MLFLOW_TRACKING_URI"])
    assert client.get_model_version_by_alias(MODEL, "champion").version == registered["version"]
    assert (download_policy(f"models:/{MODEL}@champion") / "config.json").is_file()
    assert [a.path for a in client.list_artifacts(registered["run_id"])] == ["note.txt"]
    pulled = pull_in_fresh_clone(stack, dvc_repo, tmp_path / "clone-after-restart")
    assert pulled == (dvc_repo / "data.csv").read_text()


def test_credentials_appear_in_no_log_pid_file_or_command_line(stack: Stack) -> None:
    secrets = json.loads((stack.root / "secrets.json").read_text())
    assert (stack.root / "secrets.json").stat().st_mode & 0o777 == 0o600
    values = [v for k, v in secrets.items() if "password" in k or "secret" in k]
    files = [*(stack.root / "logs").glob("*.log"), *(stack.root / "run").glob("*.pid")]
    files.append(stack.root / "mlflow-auth.ini")
    for path in files:
        text = path.read_text(errors="replace")
        assert not [v for v in values if v in text], f"a credential leaked into {path}"
    for rec in stack.seen:
        if alive(rec):
            with open(f"/proc/{rec.pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            assert not [v for v in values if v in cmdline], f"a credential is on {rec.name}'s argv"
