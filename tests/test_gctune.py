"""The collector settings are applied at start, the start-up heap frozen, all undone at stop."""

from __future__ import annotations

import gc

from twisted.internet.task import Clock

from chatd.gctune import GcTuning


def test_thresholds_and_freeze_follow_the_service() -> None:
    before = gc.get_threshold()
    clock = Clock()
    tuning = GcTuning(clock, thresholds=(40_000, 15, 5))
    tuning.startService()
    try:
        assert gc.get_threshold() == (40_000, 15, 5)
        frozen_before = gc.get_freeze_count()
        clock.advance(0)
        assert gc.get_freeze_count() > frozen_before
    finally:
        tuning.stopService()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_stopping_before_the_freeze_cancels_it() -> None:
    clock = Clock()
    tuning = GcTuning(clock)
    tuning.startService()
    tuning.stopService()
    assert clock.getDelayedCalls() == []
    assert gc.get_freeze_count() == 0
