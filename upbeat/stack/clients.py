"""What points a client (MLflow, Prefect, DVC, boto3, the rating page) at a running stack."""

from __future__ import annotations

import shlex

from upbeat.stack import postgres
from upbeat.stack.config import REGION, Secrets, StackConfig


def client_env(cfg: StackConfig, sec: Secrets) -> dict[str, str]:
    """What points MLflow, Prefect, DVC and boto3 at this stack, by each tool's own variables."""
    return {
        "MLFLOW_TRACKING_URI": cfg.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": sec.mlflow_username,
        "MLFLOW_TRACKING_PASSWORD": sec.mlflow_password,
        "PREFECT_API_URL": cfg.prefect_api,
        "PREFECT_API_AUTH_STRING": sec.prefect_auth,
        "AWS_ACCESS_KEY_ID": sec.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": sec.aws_secret_access_key,
        "AWS_ENDPOINT_URL": cfg.s3_url,  # botocore, s3fs and so DVC's S3 remote read it
        "AWS_DEFAULT_REGION": REGION,
        "UPBEAT_FEEDBACK_DB": postgres.url(cfg, "feedback"),  # upbeat/feedback/store.py
    }


def export_lines(env: dict[str, str]) -> list[str]:
    return [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
