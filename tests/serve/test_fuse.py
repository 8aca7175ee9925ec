"""The fuse against a naive reference state machine, the threshold parser and the reservoir ring."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.serve.config import ServeConfig, Threshold
from lowbit.serve.fuse import Fuse
from lowbit.serve.reservoir import InputReservoir


def reference_fuse(verdicts: list[bool], max_bad: int, recover_good: int) -> list[str]:
    """The state after each verdict, recomputed from the whole history (counts runs from the last switch)."""
    states, state, switched_at = [], "closed", 0
    for i in range(len(verdicts)):
        since = verdicts[switched_at:i + 1]
        wanted = (lambda v: v) if state == "closed" else (lambda v: not v)
        run = 0
        for v in reversed(since):
            if not wanted(v):
                break
            run += 1
        if state == "closed" and run >= max_bad:
            state, switched_at = "open", i + 1
        elif state == "open" and run >= recover_good:
            state, switched_at = "closed", i + 1
        states.append(state)
    return states


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=60), st.integers(1, 6), st.integers(1, 6))
def test_fuse_matches_reference(verdicts, max_bad, recover_good):
    fuse = Fuse(max_bad, recover_good)
    got = [fuse.record(bad).state for bad in verdicts]
    assert got == reference_fuse(verdicts, max_bad, recover_good)
    opened = sum(1 for a, b in zip(["closed"] + got, got) if a == "closed" and b == "open")
    assert fuse.state().trips == opened


def test_fuse_hysteresis_needs_full_runs_and_reset_closes():
    fuse = Fuse(max_bad=3, recover_good=2)
    for bad in (True, True, False, True, True):  # a good sample breaks the run of bad ones
        assert fuse.record(bad).state == "closed"
    assert fuse.record(True).state == "open" and fuse.state().trips == 1
    assert fuse.record(False).state == "open"
    assert fuse.record(True).state == "open"  # a bad sample breaks the run of good ones
    assert fuse.record(False).state == "open"
    state = fuse.record(False)
    assert state.state == "closed" and state.recoveries == 1 and state.consecutive_bad == 0
    for _ in range(3):
        fuse.record(True)
    assert fuse.is_open
    after = fuse.reset()
    assert after.state == "closed" and after.trips == 2 and after.consecutive_good == 0


def test_fuse_is_thread_safe():
    fuse = Fuse(max_bad=10**9, recover_good=1)
    threads = [threading.Thread(target=lambda: [fuse.record(True) for _ in range(2000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fuse.state().consecutive_bad == 8000


def test_threshold_parse_and_errors():
    t = Threshold.parse("kl=0.05, sqnr_db=20,top1_mismatch=0.5")
    assert (t.kl_max, t.sqnr_min_db, t.top1_mismatch_max) == (0.05, 20.0, 0.5)
    assert Threshold.parse("sqnr_db=3").kl_max == Threshold().kl_max
    assert Threshold.parse(None) == Threshold()
    with pytest.raises(ValueError, match="KEY=VALUE"):
        Threshold.parse("latency=3")
    with pytest.raises(ValueError, match="not a number"):
        Threshold.parse("kl=abc")
    with pytest.raises(ValueError, match="top1_mismatch"):
        Threshold.parse("top1_mismatch=2")
    with pytest.raises(ValueError, match="shadow-rate"):
        ServeConfig(".", shadow_rate=1.5)
    with pytest.raises(ValueError, match="max-bad"):
        ServeConfig(".", max_bad=0)


def test_reservoir_keeps_the_most_recent_rows():
    res = InputReservoir(5)
    with pytest.raises(ValueError, match="empty"):
        res.snapshot()
    counts = (3, 1, 4, 7)
    batches = [np.arange(2 * sum(counts[:i]), 2 * sum(counts[:i + 1]), dtype=np.float32).reshape(n, 2)
               for i, n in enumerate(counts)]  # distinct rows
    for b in batches:
        res.add(b)
    stream = np.concatenate(batches)
    np.testing.assert_array_equal(res.snapshot(), stream[-5:])
    assert len(res) == 5 and res.seen == stream.shape[0]
    batches[-1][:] = -1  # rows are copies: the caller's later writes do not reach the reservoir
    np.testing.assert_array_equal(res.snapshot(), stream[-5:])


def test_reservoir_deduplicates_rows_so_no_input_weighs_more_than_one_row():
    res = InputReservoir(8)
    few = np.arange(6, dtype=np.float32).reshape(3, 2)
    for _ in range(50):  # a client repeating three rows
        res.add(few)
    res.add(np.full((2, 2), 9, np.float32))  # a batch of two equal rows counts once
    snap = res.snapshot()
    assert snap.shape == (4, 2) and res.duplicates == 49 * 3 + 1 and res.seen == 152
    assert len({r.tobytes() for r in snap}) == 4
