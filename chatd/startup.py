"""Start-up failures an operator must fix: one line naming the option and the cause.

twistd prints a traceback for any exception raised while the service tree
starts, and its whole help text before a ``UsageError``. A port in use, an
unreadable certificate or a data directory that cannot be written are not
bugs and not usage mistakes, so chatd reports them as a
:class:`StartupError`: a ``SystemExit`` carrying the message, which Python
prints as one line (no traceback) before exiting with status 1. twistd does
not catch ``SystemExit``, whether it is raised while options are parsed,
in ``privilegedStartService`` or in ``startService``.

The checks here run before anything listens where they can (from
``Options.postOptions``, raising ``UsageError``, which ``chatd.tap.Options``
turns into a :class:`StartupError` under twistd); what only the start can
tell (a bind, creating the history file) is caught where it happens.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import endpoints
from twisted.python import usage

__all__ = ["StartupError", "bind_error", "check_endpoint_tls", "check_pem", "listen_error"]


class StartupError(SystemExit):
    """Stop the start with ``chatd: <message>`` on one line and exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(f"chatd: {message}")
        self.message = message


def _read(option: str, what: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise usage.UsageError(f"--{option}: cannot read the {what} {path!r}: {e.strerror or e}") from None


def _load(kind: str, data: bytes) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if kind == "private key":
        return serialization.load_pem_private_key(data, password=None)
    return x509.load_pem_x509_certificate(data)


def check_pem(option: str, path: str, kind: str) -> Any:
    """Read ``path`` and check it holds a PEM ``kind`` (``"certificate"`` or ``"private key"``).

    Raises a one-line ``UsageError`` naming ``--option``, the file and what
    is wrong with it; returns the loaded object (``cryptography``'s).
    """
    what = "TLS private key" if kind == "private key" else "TLS certificate"
    data = _read(option, what, path)
    try:
        return _load(kind, data)
    except TypeError:  # a password is needed
        raise usage.UsageError(f"--{option}: {path!r} is an encrypted private key; chatd needs it unencrypted") from None
    except ValueError:
        raise usage.UsageError(f"--{option}: {path!r} holds no PEM {kind}") from None


def check_key_pair(cert_option: str, cert_path: str, key_option: str, key_path: str) -> None:
    """Both files are readable PEM and the key is the certificate's."""
    from cryptography.hazmat.primitives import serialization

    cert = check_pem(cert_option, cert_path, "certificate")
    key = check_pem(key_option, key_path, "private key")
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise usage.UsageError(
            f"--{key_option}: the private key {key_path!r} does not belong to the certificate {cert_path!r}"
        )


def check_endpoint_tls(option: str, description: str) -> None:
    """For an ``ssl:`` endpoint, check its key and certificate files before Twisted reads them.

    Twisted's own errors name neither the file nor the problem in words
    (``[('DECODER routines', '', 'unsupported')]``).
    """
    try:
        args, kwargs = endpoints._parse(description)  # the endpoint string grammar, quoting included
    except Exception:
        return  # malformed: serverFromString says so
    if not args or args[0] != "ssl":
        return
    key = kwargs.get("privateKey")
    cert = kwargs.get("certKey") or key
    if key:
        check_key_pair(option, cert, option, key)
    if kwargs.get("extraCertChain"):
        check_pem(option, kwargs["extraCertChain"], "certificate")


def bind_error(address: str) -> str | None:
    """Why ``host:port`` (``[v6]:port``) cannot be bound now, in the OS's words; None if it can."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "::"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as e:
        return f"cannot resolve {host!r}: {e}"
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as e:
            return e.strerror or str(e)
    return None


def listen_error(option: str, error: Any) -> StartupError:
    """The one line for a listener that could not listen (``CannotListenError`` or another failure)."""
    interface = getattr(error, "interface", None)
    port = getattr(error, "port", None)
    cause = getattr(error, "socketError", None)
    reason = getattr(cause, "strerror", None) or str(cause if cause is not None else error)
    if port is None:
        return StartupError(f"--{option}: cannot listen: {reason}")
    where = f"{interface or '*'}:{port}" if isinstance(port, int) else str(port)
    return StartupError(f"--{option}: cannot listen on {where}: {reason}")
