"""The manhole: an interactive Python console inside the running daemon, over SSH.

**Whoever logs in can do anything the daemon can**: read every message in
memory, kick anyone, change any state, run any code as the daemon's user.
So it is off unless ``--manhole`` is given, it only speaks SSH with public
keys from an ``authorized_keys`` file (no passwords), it refuses to start
without that file, and a bare port binds loopback only.

The console's namespace holds the hub, the service tree and a few helpers
(see :func:`namespace`). As in Synapse's manhole, a coroutine or Deferred
typed at the prompt is awaited and its result printed when it arrives.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.insults import insults
from twisted.conch.ssh import keys
from twisted.cred import portal
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

log = Logger()

SERVER_USER = "server"
KICK_REASON = "removed by an operator"


def endpoint_description(value: str) -> str:
    """A bare port, or ``tcp:`` without an interface, binds loopback only."""
    value = value.strip()
    if value.isdigit():
        value = f"tcp:{value}"
    if value.startswith("tcp:") and "interface=" not in value:
        value += ":interface=127.0.0.1"
    try:
        endpoints.serverFromString(None, value)
    except Exception as e:
        raise usage.UsageError(f"--manhole: bad endpoint {value!r}: {e}") from None
    return value


def check_options(options: Any, environ: Any) -> None:
    """Normalise the manhole options; refuse a manhole nobody could safely log in to."""
    if not options["manhole"]:
        return
    options["manhole"] = endpoint_description(options["manhole"])
    keys_path = options["manhole-keys"]
    if not keys_path:
        raise usage.UsageError("--manhole needs --manhole-keys: an authorized_keys file of who may log in")
    try:
        found = _read_keys(keys_path)
    except OSError as e:
        raise usage.UsageError(f"--manhole-keys: cannot read {keys_path}: {e.strerror}") from None
    if not found:
        raise usage.UsageError(f"--manhole-keys: no usable public key in {keys_path}")
    if not options["manhole-host-key"]:
        state = environ.get("STATE_DIRECTORY", "").split(":")[0]
        if not state:
            raise usage.UsageError("--manhole needs --manhole-host-key: where the SSH host key is kept")
        options["manhole-host-key"] = os.path.join(state, "manhole_host_key")


def _read_keys(path: str) -> list[keys.Key]:
    with open(path, "rb") as f:
        return list(readAuthorizedKeyFile(f, keys.Key.fromString))


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """Keys allowed to log in, whatever the SSH user name; re-read when the file changes.

    Every signed login attempt asks for the keys, on the reactor thread and
    before authentication, so reading and parsing the file each time would
    let any peer that can reach the port make the reactor do blocking file
    I/O at will. The parsed keys are kept with the file's identity (device,
    inode, size, mtime, ctime) and only re-read when one of those changes:
    an edit or a replacement by rename still takes effect from the next
    login on, without restarting the daemon. Checking costs one ``stat``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: tuple[int, ...] | None = None
        self._keys: list[keys.Key] = []
        self._failed: str | None = None

    def getAuthorizedKeys(self, username: bytes) -> list[keys.Key]:
        try:
            st = os.stat(self.path)
            seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if seen != self._seen:
                self._keys = _read_keys(self.path)
                self._seen = seen
            self._failed = None
            return self._keys
        except OSError as e:
            self._seen, self._keys = None, []
            if self._failed != e.strerror:  # once per failure, not once per attempt
                self._failed = e.strerror
                log.error("manhole: cannot read {path}: {error}", path=self.path, error=e.strerror)
            return []


def host_key(path: str) -> keys.Key:
    """The SSH host key at ``path``, generated (Ed25519, mode 0600) if missing."""
    p = Path(path)
    if not p.exists():
        private = ed25519.Ed25519PrivateKey.generate()
        data = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        key = keys.Key.fromString(data)
        p.with_name(p.name + ".pub").write_bytes(key.public().toString("openssh") + b"\n")
        log.info("manhole: generated SSH host key {path}", path=str(p))
    return keys.Key.fromFile(str(p))


def namespace(hub: Any, services: Any, reactor: Any = None) -> dict[str, Any]:
    """What the console sees: the hub, the service tree and operator helpers."""

    def stats() -> dict:
        """The same figures as ``/stats``."""
        return hub.stats()

    def rooms() -> dict[str, int]:
        """Every active room and its number of users."""
        return hub.rooms()

    def users(room: str) -> list[str]:
        """The users in ``room``."""
        return hub.members(room)

    def kick(user: str, reason: str = KICK_REASON) -> int:
        """Close every connection of ``user``, telling them ``reason``; returns how many."""
        sessions = hub.sessions_of(user)
        for session in sessions:
            session.close(reason)
        log.info("manhole: kicked {user} ({n} connections)", user=user, n=len(sessions))
        return len(sessions)

    def broadcast(room: str, text: str) -> Any:
        """Send ``text`` to ``room`` as the user ``server``, over every protocol."""
        return hub.publish(room, SERVER_USER, text, "manhole")

    return {
        "hub": hub,
        "services": services,
        "service": services.getServiceNamed,
        "reactor": reactor,
        "defer": defer,
        "stats": stats,
        "rooms": rooms,
        "users": users,
        "kick": kick,
        "broadcast": broadcast,
    }


class _Interpreter(manhole.ManholeInterpreter):
    def displayhook(self, obj: Any) -> None:
        # The stock hook already waits on Deferreds; coroutines become one.
        if inspect.iscoroutine(obj):
            obj = defer.Deferred.fromCoroutine(obj)
        super().displayhook(obj)


class ChatdManhole(manhole.ColoredManhole):
    """The stock coloured console with an interpreter that awaits coroutines."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.interpreter = _Interpreter(self, self.namespace)


def ssh_factory(ns: dict[str, Any], authorized_keys: str, host_key_path: str) -> manhole_ssh.ConchFactory:
    """An SSH server factory whose every shell is a console over ``ns``."""
    realm = manhole_ssh.TerminalRealm()
    make: Callable[[], Any] = lambda: insults.ServerProtocol(ChatdManhole, ns)  # noqa: E731
    realm.chainedProtocolFactory = make
    checker = SSHPublicKeyChecker(AuthorizedKeysFile(authorized_keys))
    factory = manhole_ssh.ConchFactory(portal.Portal(realm, [checker]))
    key = host_key(host_key_path)
    # Instance dicts: the class attributes are shared by every ConchFactory.
    factory.privateKeys = {key.sshType(): key}
    factory.publicKeys = {key.sshType(): key.public()}
    return factory
