"""The serving process settles its heap after start-up (keybroker.server.app.settle_heap)."""

from __future__ import annotations

import gc

from keybroker.server.app import settle_heap


def test_settle_heap_moves_start_up_objects_out_of_the_collectors_reach() -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0  # the modules and wiring loaded so far
    finally:
        gc.unfreeze()
