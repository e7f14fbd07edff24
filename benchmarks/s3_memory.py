"""Benchmark: what moto's in-memory S3 costs the local stack: memory per GB stored, and the time
`upbeat stack down` (snapshot) and `up` (restore) spend on it.

Starts the stack's S3 server alone (`upbeat.stack.s3_server`, signatures enforced) on a free port
in a temporary stack folder, puts `--gib` GiB of random objects of `--mib` MiB each into the DVC
bucket, then prints the server's resident memory before and after, the snapshot's time and size,
and the time to restore the snapshot into a fresh server.

    python benchmarks/s3_memory.py [--gib 1] [--mib 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from upbeat.stack import s3
from upbeat.stack.config import DVC_BUCKET, load_secrets, resolve
from upbeat.stack.procs import Record, launch, stop, wait_ready


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB to store")
    parser.add_argument("--mib", type=int, default=64, help="MiB per object")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="upbeat-s3-bench-"))
    cfg = resolve(base, base / "stack", {"s3": free_port()})
    cfg.root.mkdir(parents=True)
    sec = load_secrets(cfg, create=True)
    assert sec is not None
    env = s3.env({k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, sec)

    def start() -> Record:
        log = cfg.logs / "s3.log"
        pid, started = launch(s3.command(cfg), env=env, log=log, cwd=cfg.root)
        rec = Record("s3", pid, started, cfg.s3_url, str(log))
        wait_ready("s3", lambda: s3.ready(cfg, sec), rec, log, 60)
        return rec

    print(f"machine: {platform_name()}; load {os.getloadavg()[0]:.1f} at start")
    rec = start()
    try:
        s3.restore(cfg, sec)  # the stack's empty buckets
        idle = rss_mib(rec.pid)
        client = s3.client(cfg, sec)
        n = max(1, round(args.gib * 1024 / args.mib))
        body = os.urandom(args.mib * 2**20)
        began = time.monotonic()
        for i in range(n):
            client.put_object(Bucket=DVC_BUCKET, Key=f"bench/{i:05d}", Body=body[i:] + body[:i])
        put_s = time.monotonic() - began
        full = rss_mib(rec.pid)
        stored = n * args.mib / 1024
        print(f"stored {stored:.2f} GiB in {n} objects of {args.mib} MiB: {put_s:.1f} s")
        rise = (full - idle) / 1024
        print(f"moto RSS: {idle:.0f} MiB idle, {full:.0f} MiB full: {rise / stored:.2f} GiB/GiB")
        began = time.monotonic()
        kept = s3.snapshot(cfg, sec)
        snap_s = time.monotonic() - began
        size = sum(f.stat().st_size for f in (cfg.root / "s3").rglob("*") if f.is_file()) / 2**30
        print(f"snapshot (`down`): {kept} objects, {size:.2f} GiB on disk, {snap_s:.1f} s")
    finally:
        stop(rec)
    rec = start()
    try:
        began = time.monotonic()
        restored = s3.restore(cfg, sec)
        print(f"restore (`up`): {restored} objects in {time.monotonic() - began:.1f} s")
        print(f"moto RSS after restore: {rss_mib(rec.pid):.0f} MiB")
    finally:
        stop(rec)
        shutil.rmtree(base, ignore_errors=True)
    print(f"load {os.getloadavg()[0]:.1f} at end")


def platform_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln), "?")
    return f"{name}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"


if __name__ == "__main__":
    sys.exit(main())
