#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 while chatd's ``/health`` answers 200.

The container engine runs it inside the container, so it asks the WebSocket
listener on loopback, wherever ``WS_PORT`` (the ``--ws`` option's variable)
put it: a bare number or ``tcp:N`` is HTTP, ``ssl:N`` is HTTPS (the
certificate is not checked: it is the same process, and often self-signed).
A listener this cannot reach (``unix:``) needs its own check: set
``HEALTHCHECK_URL``. Only the standard library, so it starts fast.
"""

from __future__ import annotations

import os
import re
import ssl
import sys
import urllib.request


def health_url(environ: dict[str, str]) -> str:
    """The URL of ``/health`` on this container's ``--ws`` listener."""
    if environ.get("HEALTHCHECK_URL"):
        return environ["HEALTHCHECK_URL"]
    ws = environ.get("WS_PORT") or "tcp:8080"
    if ws.isdigit():
        ws = f"tcp:{ws}"
    match = re.match(r"(tcp|ssl):(?:port=)?(\d+)", ws)
    if match is None:
        raise SystemExit(f"chatd-healthcheck: cannot reach WS_PORT={ws!r}; set HEALTHCHECK_URL")
    scheme = "https" if match[1] == "ssl" else "http"
    return f"{scheme}://127.0.0.1:{match[2]}/health"


def main() -> int:
    url = health_url(dict(os.environ))
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            print(response.read().decode(errors="replace"))
            return 0
    except OSError as e:  # HTTPError (a 503 while draining) included
        print(f"chatd-healthcheck: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
