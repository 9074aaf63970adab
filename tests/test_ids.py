"""Message ids: random version 4 UUIDs, unique, never shared with a forked worker."""

from __future__ import annotations

import os
import uuid

from chatd.events import new_id


def test_ids_are_uuid4_hex_and_unique() -> None:
    ids = [new_id() for _ in range(5000)]  # several refills of the pool
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.hex == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_a_forked_child_makes_ids_of_its_own() -> None:
    new_id()  # the pool now holds ids a child would inherit
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        try:
            os.write(write, new_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = [new_id() for _ in range(300)]
    assert len(child) == 32
    assert child not in parent
