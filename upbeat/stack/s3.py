"""The S3 endpoint: moto's server with signatures enforced (`s3_server`), buckets kept in the stack
folder.

moto keeps objects in memory only: its recorder (`MOTO_ENABLE_RECORDING`) logs requests to
replay, signed headers included, which is neither a store nor free of credentials. So `down`
copies every bucket into `s3/` (a manifest plus content-addressed blobs) before stopping the
server, and `up` puts them back. Objects written since the last `down` are lost if moto dies
any other way; a production stack uses a real object store instead.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from upbeat.stack.config import DVC_BUCKET, HOST, MLFLOW_BUCKET, REGION, Secrets, StackConfig

BUCKETS = (MLFLOW_BUCKET, DVC_BUCKET)


def command(cfg: StackConfig) -> list[str]:
    return [
        sys.executable,
        "-m",
        "upbeat.stack.s3_server",
        "--host",
        HOST,
        "--port",
        str(cfg.s3_port),
    ]


def env(base: dict[str, str], sec: Secrets) -> dict[str, str]:
    """The server's environment: the one access key it accepts (never on its command line)."""
    return {
        **base,
        "AWS_ACCESS_KEY_ID": sec.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": sec.aws_secret_access_key,
    }


def snapshot_dir(cfg: StackConfig) -> Path:
    return cfg.root / "s3"


def client(cfg: StackConfig, sec: Secrets, **config: Any) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=cfg.s3_url,
        region_name=REGION,
        aws_access_key_id=sec.aws_access_key_id,
        aws_secret_access_key=sec.aws_secret_access_key,
        config=Config(**config) if config else None,
    )


def ready(cfg: StackConfig, sec: Secrets) -> bool:
    """The server lists the buckets for a request signed with the stack's key."""
    quick = client(cfg, sec, connect_timeout=2, read_timeout=5, retries={"max_attempts": 1})
    return "Buckets" in quick.list_buckets()


def restore(cfg: StackConfig, sec: Secrets) -> int:
    """Create the stack's buckets and put back the last snapshot; returns objects restored."""
    s3 = client(cfg, sec)
    manifest_file = snapshot_dir(cfg) / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    count = 0
    for bucket in dict.fromkeys([*BUCKETS, *manifest]):
        if bucket not in have:
            s3.create_bucket(Bucket=bucket)
        for key, meta in manifest.get(bucket, {}).items():
            blob = snapshot_dir(cfg) / "blobs" / meta["sha256"]
            s3.put_object(
                Bucket=bucket,
                Key=key,
                Body=blob.read_bytes(),
                ContentType=meta.get("content_type") or "binary/octet-stream",
                Metadata=meta.get("metadata") or {},
            )
            count += 1
    return count


def snapshot(cfg: StackConfig, sec: Secrets) -> int:
    """Copy every bucket's objects into the stack folder; returns how many objects it holds."""
    s3 = client(cfg, sec)
    blobs = snapshot_dir(cfg) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot_dir(cfg).chmod(0o700)  # the buckets' copy: only the stack's owner, as S3 allows
    manifest: dict[str, dict[str, dict[str, Any]]] = {}
    for bucket in (b["Name"] for b in s3.list_buckets().get("Buckets", [])):
        manifest[bucket] = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                obj = s3.get_object(Bucket=bucket, Key=item["Key"])
                body = obj["Body"].read()
                digest = hashlib.sha256(body).hexdigest()
                if not (blobs / digest).is_file():
                    tmp = blobs / f".{digest}.tmp"
                    tmp.write_bytes(body)
                    tmp.replace(blobs / digest)
                manifest[bucket][item["Key"]] = {
                    "sha256": digest,
                    "content_type": obj.get("ContentType"),
                    "metadata": obj.get("Metadata") or {},
                }
    tmp = snapshot_dir(cfg) / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tmp.replace(snapshot_dir(cfg) / "manifest.json")
    kept = {meta["sha256"] for objects in manifest.values() for meta in objects.values()}
    for blob in blobs.iterdir():
        if blob.name not in kept:
            blob.unlink()
    return sum(len(objects) for objects in manifest.values())


def data_location(cfg: StackConfig) -> str:
    return f"memory; snapshot in {snapshot_dir(cfg)} (buckets {', '.join(BUCKETS)})"
