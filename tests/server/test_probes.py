"""The probe board's arithmetic (pure): readiness of every worker, stale heartbeats."""

from __future__ import annotations

import time

import pytest

from keybroker.server.probes import LOOPS, ProbeBoard


def test_a_worker_that_never_reported_is_neither_ready_nor_live() -> None:
    board = ProbeBoard(2)
    assert not board.ready()
    assert board.stale(60.0) == [f"worker {w}: {loop}" for w in (0, 1) for loop in LOOPS]


def test_every_worker_must_be_ready_and_every_loop_fresh() -> None:
    board = ProbeBoard(2)
    workers = [board.for_worker(0), board.for_worker(1)]
    for worker in workers:
        worker.set_ready(True)
        for loop in LOOPS:
            worker.heartbeat(loop)()
    assert board.ready()
    assert board.stale(5.0) == []
    workers[1].set_ready(False)
    assert not board.ready()
    later = time.monotonic() + 10.0
    assert len(board.stale(5.0, now=later)) == 2 * len(LOOPS)
    assert board.stale(60.0, now=later) == []


def test_a_worker_outside_the_board_is_refused() -> None:
    with pytest.raises(ValueError, match="no worker 2"):
        ProbeBoard(2).for_worker(2)
