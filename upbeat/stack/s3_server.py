"""moto's S3 server with signatures enforced: `python -m upbeat.stack.s3_server --host H --port P`.

moto checks SigV4 signatures and IAM policies once `INITIAL_NO_AUTH_ACTION_COUNT` is 0, against
the users of its own IAM backend. So before serving, this process creates one IAM user holding
the stack's access key (read from its environment, as the AWS clients read it) with a policy that
allows S3 and nothing else. moto checks only signatures in the `Authorization` header; a presigned
URL (the signature in the query: MLflow's server hands its clients those for downloads) is checked
here, against the same key, before moto sees it. Anything else (anonymous, SigV2) and moto's own
`/moto-api` (which resets and dumps every backend, the IAM secret included) get 403.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

ACCOUNT = "123456789012"  # moto's default account; MOTO_ACCOUNT_ID pins every request to it
USER = "upbeat-stack"
POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}
_presigned = threading.local()  # set while moto handles a presigned request checked here
DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>a request signed with the stack's AWS key (SigV4) is required</Message></Error>"
)


def add_key(key_id: str, secret: str) -> None:
    """Create the IAM user of the stack's key, allowed S3 only."""
    from moto.iam.models import iam_backends

    iam = iam_backends[ACCOUNT]["aws"]
    iam.create_user("us-east-1", USER)
    iam.put_user_policy(USER, "s3-only", json.dumps(POLICY))
    key = iam.create_access_key(USER)
    del iam.access_keys[key.physical_resource_id]  # moto generated its own id and secret
    key.access_key_id, key.secret_access_key = key_id, secret
    iam.access_keys[key.physical_resource_id] = key


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def presigned_ok(environ: dict[str, Any], key_id: str, secret: str) -> bool:
    """Is the query's SigV4 signature (a presigned URL) the stack key's, and not expired?"""
    raw_path, _, raw_query = (environ.get("RAW_URI") or environ.get("PATH_INFO", "")).partition("?")
    params = parse_qsl(raw_query or environ.get("QUERY_STRING", ""), keep_blank_values=True)
    given = dict(params)
    scope = given.get("X-Amz-Credential", "").split("/")
    if given.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or len(scope) != 5 or scope[0] != key_id:
        return False
    try:
        signed_at = datetime.strptime(given["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        expires = timedelta(seconds=int(given["X-Amz-Expires"]))
        headers = given["X-Amz-SignedHeaders"].split(";")
        signature = given["X-Amz-Signature"]
    except (KeyError, ValueError):
        return False
    if datetime.now(UTC) > signed_at + expires:
        return False
    query = sorted(
        (quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in params if k != "X-Amz-Signature"
    )
    values = {h: environ.get("HTTP_" + h.upper().replace("-", "_"), "").strip() for h in headers}
    canonical = "\n".join(
        [
            environ["REQUEST_METHOD"],
            quote(unquote(raw_path), safe="/~"),
            "&".join(f"{k}={v}" for k, v in query),
            "".join(f"{h}:{values[h]}\n" for h in headers),
            ";".join(headers),
            "UNSIGNED-PAYLOAD",
        ]
    )
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            given["X-Amz-Date"],
            "/".join(scope[1:]),
            hashlib.sha256(canonical.encode()).hexdigest(),
        ]
    )
    key = ("AWS4" + secret).encode()
    for part in scope[1:]:
        key = _hmac(key, part)
    return hmac.compare_digest(
        hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(), signature
    )


def skip_moto_auth_for_checked_presigned() -> None:
    """moto reads the signature from the `Authorization` header only (a presigned request has
    none): let a request this module checked through, in the thread that handles it."""
    from moto.core.authorization import ActionAuthenticatorMixin

    check = ActionAuthenticatorMixin._authenticate_and_authorize_action

    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        if not getattr(_presigned, "ok", False):
            check(self, *args, **kwargs)

    ActionAuthenticatorMixin._authenticate_and_authorize_action = checked  # type: ignore[method-assign]


def signed_only(
    app: Callable[..., Iterable[bytes]], key_id: str, secret: str
) -> Callable[..., Iterable[bytes]]:
    """The WSGI app, answering 403 to what moto's signature check would not see, and passing a
    valid presigned request on as moto's own unauthenticated path takes it."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        header = environ.get("HTTP_AUTHORIZATION", "").startswith("AWS4-HMAC-SHA256 Credential=")
        if not path.startswith("/moto-api") and header:
            return app(environ, start_response)
        if not path.startswith("/moto-api") and presigned_ok(environ, key_id, secret):
            _presigned.ok = True
            try:
                return app(environ, start_response)
            finally:
                _presigned.ok = False
        start_response(
            "403 Forbidden",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(DENIED)))],
        )
        return [DENIED]

    return guarded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    key_id, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    os.environ.update(
        INITIAL_NO_AUTH_ACTION_COUNT="0", MOTO_ACCOUNT_ID=ACCOUNT, MOTO_PORT=str(args.port)
    )

    import signal
    import sys

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    add_key(key_id, secret)
    skip_moto_auth_for_checked_presigned()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = signed_only(DomainDispatcherApplication(create_backend_app), key_id, secret)
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
