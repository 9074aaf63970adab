"""A subscription that dies silently (no FIN, no RST) must be noticed, not waited on for ever.

A NAT, firewall or load balancer between chatd and Redis that drops an idle
flow (Azure's 4 minutes is shorter than Redis's default ``tcp-keepalive 300``)
leaves the subscriber's socket open with nothing coming through. The
subscriber connection has no reply timeout (txredisapi's default for it) and
sends nothing, so it never finds out: messages stored by other processes never
reach this process's members, and this process's own senders never get
``sent`` (their ack waits for the message to come back on the subscription).
"""

from __future__ import annotations

import socket
import threading
import time

from tests.daemon import free_port
from tests.redisserver import RedisServer
from tests.test_redis import chatd
from tests.wsclient import Client


class Blackhole:
    """A loopback TCP proxy to Redis that can silently stop passing a subscriber's bytes."""

    def __init__(self, target: int) -> None:
        self.port = free_port()
        self.target = target
        self.frozen: set[socket.socket] = set()
        self.subscribers: list[socket.socket] = []
        self.piped: list[socket.socket] = []
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.piped += (client, upstream)
            threading.Thread(target=self._pipe, args=(client, upstream, client), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, key: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if data and key in self.frozen:
                continue  # dropped on the floor; the flow stays open
            if not data:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            if src is key and b"SUBSCRIBE" in data.upper():
                self.subscribers.append(key)
            dst.sendall(data)

    def freeze_subscribers(self) -> None:
        self.frozen.update(self.subscribers)

    def close(self) -> None:
        """End the proxy's threads: its accept and every pipe (a closed socket alone wakes neither)."""
        for s in (self.server, *self.piped):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_a_silently_dead_subscription_is_noticed_and_nothing_is_lost(redis: RedisServer) -> None:
    hole = Blackhole(redis.port)
    try:
        url = f"redis://127.0.0.1:{hole.port}/0"
        with chatd(redis) as a, chatd(redis, "--redis", url) as b:
            with Client(a.ws_url) as alice, Client(b.ws_url) as bob:
                alice.join("r", "alice")
                bob.join("r", "bob")
                alice.recv_until(lambda f: f.get("type") == "presence" and f["user"] == "bob")
                assert hole.subscribers, "b's subscription did not go through the proxy"
                hole.freeze_subscribers()
                time.sleep(1)
                alice.send(type="message", room="r", message="to bob", ref=1)
                assert alice.recv_until(lambda f: f.get("ref") == 1)["type"] == "sent"
                got = bob.recv_type("message", timeout=30)
                bob.send(type="message", room="r", message="from bob", ref=2)
                reply = bob.recv_until(lambda f: f.get("ref") == 2, timeout=30)
    finally:
        hole.close()
    assert got["message"] == "to bob"
    assert reply["type"] == "sent"
