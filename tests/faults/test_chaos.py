"""A bounded run of the chaos campaign (`make chaos` runs it longer): replicas SIGKILLed and
frozen, connections reset and slowed by a fault proxy, redis-server killed -9 and restarted
from its AOF, producers sending malformed entries, resubmits, cancels, tight deadlines and
long generation jobs. Nothing lost, nothing answered twice, nothing stuck, PING p99 < 50 ms."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.campaign import PING_P99_MAX_MS, run

pytestmark = pytest.mark.integration

MINUTES = 1.5
SEED = 20261206


def test_a_seeded_chaos_run_loses_nothing_doubles_nothing_and_stalls_nothing(
    tmp_path: Path,
) -> None:
    verdict = run(MINUTES, SEED, tmp_path, progress=False)
    print(verdict.table())
    assert sum(verdict.faults.values()) >= 15, verdict.faults
    assert {"replica_kill", "replica_freeze", "redis_kill"} <= set(verdict.faults)
    assert verdict.jobs["chaos-embed"] > 1000 and verdict.jobs["chaos-gen"] > 0
    assert verdict.lost == [], verdict.lost[:10]
    assert verdict.answered_twice == [], verdict.answered_twice[:10]
    assert verdict.stuck == 0
    assert verdict.unexpected_letters == [], verdict.unexpected_letters
    # appendfsync always: no result a client read was lost or replaced across the kill -9s.
    assert verdict.results_read > 500 and verdict.read_then_changed == []
    assert verdict.ping_samples > 1000 and verdict.ping_p99_ms < PING_P99_MAX_MS, verdict.table()
