"""``twistd chatd`` options and the service tree, without listening."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from chatd import tap


def parse(*argv: str, **environ: str) -> tap.Options:
    options = tap.Options(environ=environ)
    options.parseOptions(list(argv))
    return options


def test_defaults_are_the_documented_ones() -> None:
    options = parse()
    assert options["ws"] == "tcp:8080"
    assert options["max-connections"] == 10000
    assert options["history-limit"] == 100
    assert options["max-message-length"] == 4096


def test_environment_fills_in_and_a_bare_number_means_tcp() -> None:
    options = parse(WS_PORT="9000", MAX_CONNECTIONS="5", READ_BUFFER_SIZE="1024")
    assert options["ws"] == "tcp:9000"
    assert options["max-connections"] == 5
    assert options["read-buffer-size"] == 1024


def test_flags_win_over_the_environment() -> None:
    options = parse("--ws", "tcp:9100:interface=127.0.0.1", "--max-connections", "7", WS_PORT="9000", MAX_CONNECTIONS="5")
    assert options["ws"] == "tcp:9100:interface=127.0.0.1"
    assert options["max-connections"] == 7


@pytest.mark.parametrize(
    "argv, environ, message",
    [
        (["--max-connections", "many"], {}, "--max-connections must be a whole number"),
        (["--max-connections", "0"], {}, "--max-connections must be at least 1"),
        ([], {"MAX_CONNECTIONS": "-3"}, "--max-connections must be at least 1"),
        (["--ws", "carrier-pigeon:42"], {}, "--ws: bad endpoint"),
        (["--ws", "tcp:notaport"], {}, "--ws: bad endpoint"),
    ],
)
def test_bad_values_fail_at_start_with_one_line(argv, environ, message) -> None:
    with pytest.raises(usage.UsageError) as info:
        parse(*argv, **environ)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_help_documents_every_option_and_its_environment_variable() -> None:
    text = str(tap.Options(environ={}))
    for name, (env, _, _) in {**tap.LISTENERS, **tap.INTEGERS, **tap.STRINGS}.items():
        assert f"--{name}=" in text
        assert env in text


def test_service_tree_has_gc_tuning_event_dispatch_and_the_hub_first_then_the_listeners() -> None:
    reactor = MemoryReactorClock()
    service = tap.makeService(parse(), reactor=reactor)
    names = [s.name for s in service]
    assert names[:3] == ["gc", "event-dispatch", "hub"]
    assert "ws" in names
    hub = service.getServiceNamed("hub")
    assert hub.max_connections == 10000
    assert hub.limits.max_message_length == 4096
