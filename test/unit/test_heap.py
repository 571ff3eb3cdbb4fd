"""Freezing the start-up heap: start-up objects leave the collector's passes, later garbage is still collected."""

from __future__ import annotations

import gc
import weakref

from common.heap import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_start_up_objects_are_frozen_and_later_cycles_still_collected() -> None:
    kept = [_Node() for _ in range(100)]
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() and frozen >= len(kept)
        assert not any(gc.is_tracked(n) and n in gc.get_objects() for n in kept[:3])  # out of every generation
        later = _Node()
        ref = weakref.ref(later)
        del later
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()
