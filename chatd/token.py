"""Mint a token for chatd: ``python -m chatd.token alice --rooms general,ops --ttl 1h``.

Prints an HS256 JWT (``sub`` = the user, ``iat``, ``exp``, and ``rooms``
when given) signed with the same secret the daemon checks, read the same
way: ``--secret``/``--secret-file``, else the ``AUTH_SECRET``/
``AUTH_SECRET_FILE`` environment variables. With ``--private-key`` it signs
RS256 or ES256 instead, for a daemon started with ``--auth-public-key``.
Meant for operators and tests; a real deployment's login service mints the
same claims with any JWT library.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jwt
from twisted.python import usage

from chatd import validate
from chatd.auth import read_secret
from chatd.validate import ChatError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TTL_RE = re.compile(r"(\d+)([smhd]?)")


def parse_ttl(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` -> seconds (at least 1)."""
    match = _TTL_RE.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"--ttl: expected a positive duration like 90s, 15m, 1h or 7d, not {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def claims(
    user: str, ttl: int, rooms: Sequence[str] | None = None, now: float | None = None
) -> dict[str, Any]:
    """The claims of a token for ``user``, valid ``ttl`` seconds from ``now``; checked as the daemon will."""
    issued = int(time.time() if now is None else now)
    body: dict[str, Any] = {"sub": validate.user(user), "iat": issued, "exp": issued + ttl}
    if rooms is not None:
        body["rooms"] = [validate.room(r) for r in rooms]
    return body


def _private_key(path: str) -> tuple[Any, str]:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    with open(path, "rb") as f:
        key = load_pem_private_key(f.read(), password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
        return key, "ES256"
    raise ValueError("--private-key: expected an RSA or EC P-256 private key")


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    environ = dict(os.environ) if environ is None else environ
    parser = argparse.ArgumentParser(prog="python -m chatd.token", description=__doc__.split("\n\n")[0])
    parser.add_argument("user", help="the user name the token proves (its sub claim)")
    parser.add_argument("--rooms", help="comma-separated rooms the token allows (default: any room)")
    parser.add_argument(
        "--ttl", default="1h", help="how long the token is valid: 90s, 15m, 1h, 7d (default 1h)"
    )
    parser.add_argument("--secret", help="the HS256 secret [env AUTH_SECRET]")
    parser.add_argument("--secret-file", help="a file holding the secret [env AUTH_SECRET_FILE]")
    parser.add_argument("--private-key", help="sign RS256/ES256 with this PEM private key instead")
    args = parser.parse_args(argv)
    try:
        ttl = parse_ttl(args.ttl)
        rooms = [r.strip() for r in args.rooms.split(",") if r.strip()] if args.rooms is not None else None
        body = claims(args.user, ttl, rooms)
        if args.private_key:
            key, algorithm = _private_key(args.private_key)
        else:
            # Flags win over the environment, per option, as for the daemon.
            secret = args.secret if args.secret is not None else environ.get("AUTH_SECRET", "")
            secret_file = (
                args.secret_file if args.secret_file is not None else environ.get("AUTH_SECRET_FILE", "")
            )
            raw = read_secret(secret, secret_file, "--secret")
            if raw is None:
                raise ValueError("no secret: give --secret, --secret-file, AUTH_SECRET or AUTH_SECRET_FILE")
            key, algorithm = raw, "HS256"
    except ChatError as e:
        parser.exit(2, f"chatd.token: {e.reason}\n")
    except (ValueError, OSError, usage.UsageError) as e:
        parser.exit(2, f"chatd.token: {e}\n")
    print(jwt.encode(body, key, algorithm=algorithm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
