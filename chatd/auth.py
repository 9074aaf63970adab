"""Token authentication: the one place a JWT is read, checked and turned into an :class:`Identity`.

Off unless ``--auth-secret``/``--auth-secret-file`` (HS256) or
``--auth-public-key`` (RS256 or ES256, by the key's type) is given. Then
every chat connection must present a token, and every adapter hands it to
:meth:`Authenticator.verify` before anything else happens:

- WebSocket ``/ws``: ``?token=`` on the URL (browsers cannot set headers on
  a WebSocket) or ``Authorization: Bearer``;
- SignalR: ``access_token`` in the query (WebSockets and SSE from browsers)
  or ``Authorization: Bearer`` (negotiate, long polling, POSTs, and every
  request from Node and .NET clients), as the official clients'
  ``accessTokenFactory`` sends it;
- gRPC: ``authorization: Bearer ...`` metadata on every ``chat.ChatService``
  call (health and reflection stay open).

A token is an HS256/RS256/ES256 JWT with ``sub`` (the user name, checked
like any user name) and ``exp`` (required: a token that never expires
could only be revoked by changing the key), optionally ``nbf``, and
optionally ``rooms``, a list of room names the connection may join, send to,
stream and read. A token from an OAuth2/OpenID Connect provider names its
audience (``aud``) and issuer (``iss``): ``--auth-audience`` makes ``aud``
required and one of its values this name, ``--auth-issuer`` the same for
``iss``. Without ``--auth-audience`` a token that names an audience is
refused (it was minted for some service, perhaps another one). Expiry is
checked against the injected clock (the reactor), not the wall clock of
PyJWT, so tests drive it with
``twisted.internet.task.Clock``; the hub closes a connection whose token
expires while it is open.

The hub enforces the identity (``Session.identity``): the user name is
fixed to ``sub`` (:meth:`Identity.check_user`) and rooms outside the claim
are refused (:meth:`Identity.check_room`), with errors in each protocol's
own form (:class:`Forbidden`: a WebSocket error reply, a SignalR completion
error, gRPC ``PERMISSION_DENIED``).
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass
from typing import Any

import jwt
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage

from chatd import validate
from chatd.logs import printable
from chatd.validate import ChatError

#: a longer token is refused unread (a header that large is an attack, not a login)
MAX_TOKEN_LENGTH = 8192
#: the shortest HS256 secret accepted: RFC 7518 section 3.2 asks for a key as long as the hash
MIN_SECRET_BYTES = 32


class Unauthenticated(ChatError):
    """No token, or one that is forged, malformed or expired: HTTP 401, gRPC ``UNAUTHENTICATED``."""


class Forbidden(ChatError):
    """A valid token that does not allow this (another user name, a room outside its claim)."""


@dataclass(frozen=True)
class Identity:
    """Who a verified token says the client is, and what it may do.

    ``rooms`` is None when the token names no rooms (any room is allowed);
    ``expires`` is the ``exp`` claim, in seconds since the epoch.
    """

    user: str
    rooms: frozenset[str] | None = None
    expires: float | None = None

    def allows(self, room: str) -> bool:
        return self.rooms is None or room in self.rooms

    def check_room(self, room: str) -> None:
        """Raise :class:`Forbidden` unless the token allows ``room``."""
        if not self.allows(room):
            raise Forbidden(f"not allowed in room {room}")

    def check_user(self, user: str) -> None:
        """Raise :class:`Forbidden` unless ``user`` is the token's own name."""
        if user != self.user:
            raise Forbidden(f"the token is for user {self.user}, not {user}")


def bearer(authorization: str | bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None if it is not one."""
    if authorization is None:
        return None
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    """Verifies tokens with one key and one algorithm, against an injected clock."""

    def __init__(
        self,
        key: Any,
        algorithm: str,
        clock: IReactorTime,
        leeway: float = 0.0,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        self._key = key
        self.algorithm = algorithm
        self.clock = clock
        self.leeway = leeway
        self.audience = audience
        self.issuer = issuer
        self._required = ["sub", "exp", *(["aud"] if audience else []), *(["iss"] if issuer else [])]

    def verify(self, token: str | None) -> Identity:
        """The identity a token proves; raises :class:`Unauthenticated` with the reason."""
        if not token:
            raise Unauthenticated("a token is required")
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated(f"invalid token: longer than {MAX_TOKEN_LENGTH} characters")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                # Time is checked below on our clock; presence of the claims here.
                options={
                    "require": self._required,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidAudienceError as e:
            if self.audience is None:
                raise Unauthenticated(
                    "invalid token: it names an audience (aud) and this server has none: set --auth-audience"
                ) from None
            raise Unauthenticated(f"invalid token: {printable(str(e))} (aud must name {self.audience!r})") from None
        except jwt.InvalidIssuerError as e:
            raise Unauthenticated(f"invalid token: {printable(str(e))} (iss must be {self.issuer!r})") from None
        except jwt.InvalidTokenError as e:
            # PyJWT's text may quote the token (a "crit" extension's name, say): it becomes one
            # printable line before it reaches an HTTP status line, gRPC details or the log.
            raise Unauthenticated(f"invalid token: {printable(str(e))}") from None
        now = self.clock.seconds()
        expires = _number(claims["exp"], "exp")
        if now >= expires + self.leeway:
            raise Unauthenticated("token expired")
        if "nbf" in claims and now < _number(claims["nbf"], "nbf") - self.leeway:
            raise Unauthenticated("token not valid yet")
        try:
            user = validate.user(claims["sub"])
        except ChatError as e:
            raise Unauthenticated(f"invalid token: sub is not a user name: {e.reason}") from None
        return Identity(user, _rooms(claims.get("rooms")), expires)

    def from_request(self, authorization: str | bytes | None, query_token: str | None) -> Identity:
        """Verify the token of an HTTP request: the ``Authorization`` header, else the query's."""
        return self.verify(bearer(authorization) or query_token)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise Unauthenticated(f"invalid token: {name} must be a number")
    return float(value)


def _rooms(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise Unauthenticated("invalid token: rooms must be a list of room names")
    try:
        return frozenset(validate.room(r) for r in value)
    except ChatError as e:
        raise Unauthenticated(f"invalid token: rooms: {e.reason}") from None


def check_metrics_token(expected: str, authorization: str | bytes | None) -> bool:
    """Whether a request to ``/metrics`` carries ``Authorization: Bearer <expected>`` (constant time)."""
    given = bearer(authorization)
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


# -- keys and options ------------------------------------------------------------


#: a secret file larger than this is a mistake (a device, a key bundle)
MAX_SECRET_FILE = 4096


def read_secret(secret: str, secret_file: str, what: str = "--auth-secret") -> bytes | None:
    """The HS256 secret from a value or a file (one line; its newline dropped); None if neither.

    Raises ``usage.UsageError`` when both are given, the file cannot be read
    or holds more than one line, or the secret is shorter than
    :data:`MIN_SECRET_BYTES`.
    """
    if secret and secret_file:
        raise usage.UsageError(f"give {what} or {what}-file, not both")
    if secret_file:
        try:
            with open(secret_file, "rb") as f:
                raw = f.read(MAX_SECRET_FILE + 1).rstrip(b"\r\n")
        except OSError as e:
            raise usage.UsageError(f"{what}-file: cannot read {secret_file!r}: {e.strerror}") from None
        if len(raw) > MAX_SECRET_FILE or b"\n" in raw:
            raise usage.UsageError(
                f"{what}-file: {secret_file!r} must hold one line, the secret (try: openssl rand -base64 32)"
            )
    elif secret:
        raw = secret.encode()
    else:
        return None
    if len(raw) < MIN_SECRET_BYTES:
        raise usage.UsageError(
            f"{what} must be at least {MIN_SECRET_BYTES} bytes (try: openssl rand -base64 32), not {len(raw)}"
        )
    return raw


def load_public_key(path: str) -> tuple[Any, str]:
    """A PEM public key and the algorithm it verifies (RSA: RS256, EC P-256: ES256)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        with open(path, "rb") as f:
            key = load_pem_public_key(f.read())
    except (OSError, ValueError) as e:
        raise usage.UsageError(f"--auth-public-key: cannot load {path!r}: {e}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return key, "ES256"
    raise usage.UsageError("--auth-public-key: expected an RSA or EC P-256 public key (RS256, ES256)")


#: option -> (environment variable, help): the token options of ``twistd chatd``
OPTIONS: dict[str, tuple[str, str]] = {
    "auth-secret": (
        "AUTH_SECRET",
        "turn token authentication on: the HS256 secret (at least 32 bytes) that signs clients' JWTs; "
        "prefer --auth-secret-file or the environment (a flag shows in ps)",
    ),
    "auth-secret-file": ("AUTH_SECRET_FILE", "the same, read from a file (one line, the secret; a file of more lines is refused)"),
    "auth-public-key": (
        "AUTH_PUBLIC_KEY",
        "turn token authentication on with RS256 or ES256 JWTs: the PEM public key that verifies them",
    ),
    "auth-audience": (
        "AUTH_AUDIENCE",
        "the audience (aud) tokens must name, as an identity provider mints them for this service; "
        "without it a token that names an audience is refused",
    ),
    "auth-issuer": ("AUTH_ISSUER", "the issuer (iss) tokens must name, e.g. https://id.example.com/"),
    "metrics-token": ("METRICS_TOKEN", "require 'Authorization: Bearer TOKEN' on /metrics"),
}

#: options whose values are secrets: never put on a worker's command line
SECRET_OPTIONS: dict[str, str] = {"auth-secret": "AUTH_SECRET", "metrics-token": "METRICS_TOKEN"}


def check_options(options: Any) -> None:
    """Called from ``Options.postOptions``: load the key once, refuse unusable settings."""
    if options.get("auth-secret-given") and not options["auth-secret"]:
        # An explicit --auth-secret "" (an unset variable, say) must not start an open server.
        raise usage.UsageError("--auth-secret is empty: give the secret, or leave the option out to run without tokens")
    secret = read_secret(options["auth-secret"], options["auth-secret-file"])
    if secret is not None and options["auth-public-key"]:
        raise usage.UsageError("give --auth-secret(-file) or --auth-public-key, not both")
    if secret is not None:
        options["auth-key"] = (secret, "HS256")
    elif options["auth-public-key"]:
        options["auth-key"] = load_public_key(options["auth-public-key"])
    else:
        options["auth-key"] = None
    for name in ("auth-audience", "auth-issuer"):
        if options[name] and options["auth-key"] is None:
            raise usage.UsageError(
                f"--{name} needs token authentication: give --auth-secret(-file) or --auth-public-key too"
            )


def from_options(options: Any, clock: IReactorTime) -> Authenticator | None:
    """The authenticator ``twistd chatd``'s options ask for, or None when tokens are off."""
    key = options.get("auth-key") if hasattr(options, "get") else options["auth-key"]
    if key is None:
        return None
    return Authenticator(
        key[0], key[1], clock, audience=options["auth-audience"] or None, issuer=options["auth-issuer"] or None
    )


def secret_environment(options: Any) -> dict[str, str]:
    """The secret options as environment variables, for a worker process (not its argv)."""
    return {env: options[name] for name, env in SECRET_OPTIONS.items() if options[name]}
