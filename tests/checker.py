"""The one invariant every fault test proves: each job id that entered ends with exactly one
final result, or one dead letter with its reason (DESIGN.md §3.1).

Redis can tell it from the outside alone:

- the stored result `sluice:{M}:result:<id>` is the one final result (SET NX: first writer wins,
  so a second result can never overwrite it);
- a second *answer* would show on the job's `reply_to` stream: every push carries the stored
  result, so what was pushed is what is stored, whoever pushed it. Pushes are at-least-once (a
  retried write, a duplicate run, a reclaimed entry push the same result again): repeats are
  counted, never a different result. An entry is acked only after its push, so none is missing
  unless a caller says so (`max_missing_pushes`, for replies it chose not to wait for);
- the dead stream holds at most one letter per id (and per entry), whose job got the stored
  `dead_lettered` error; letters of entries with no usable id are counted apart;
- nothing is left pending or undelivered in any lane of the group.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from sluice.protocol import GROUP, JOB_ID_RE, STATUSES, dead_key, lane_keys, result_key

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What the checker found, for the test to assert counts on."""

    results: dict[str, dict[str, Any]]  # id -> its stored result
    dead: dict[str, dict[str, str]]  # id -> its one dead letter (checked ids only)
    dead_without_id: list[dict[str, str]]  # letters of entries with no usable id
    pushes: Counter[str] = field(default_factory=Counter)  # id -> pushes seen (repeats: >1)
    missing_pushes: list[str] = field(default_factory=list)

    @property
    def statuses(self) -> Counter[str]:
        """ok / error / expired / cancelled, over the checked ids."""
        return Counter(res["status"] for res in self.results.values())

    @property
    def error_codes(self) -> Counter[str]:
        """The codes of the `error` results (`dead_lettered` included)."""
        return Counter(
            res["error"]["code"] for res in self.results.values() if res["status"] == "error"
        )

    @property
    def ok(self) -> int:
        return self.statuses["ok"]

    def summary(self) -> str:
        return (
            f"{len(self.results)} ids: {dict(self.statuses)}, errors {dict(self.error_codes)}, "
            f"{len(self.dead)} dead letters, {len(self.dead_without_id)} without an id, "
            f"{len(self.missing_pushes)} pushes missing, {self.repeated_pushes} repeated"
        )

    @property
    def repeated_pushes(self) -> int:
        """Pushes beyond the first of an id (the same stored result again: at-least-once)."""
        return sum(n - 1 for n in self.pushes.values() if n > 1)


def check_exactly_once(
    r: redis.Redis,
    model: str,
    ids: Sequence[str],
    *,
    reply_streams: Sequence[str] = (),
    expect_pushed: Iterable[str] | None = None,
    max_missing_pushes: int = 0,
    allow_dead: bool = False,
    expect_status: str | None = None,
    timeout_s: float = 120.0,
) -> Report:
    """Waits up to `timeout_s` for every id's final result and an idle group, then asserts
    the invariant, with messages naming the ids at fault.

    Args:
        ids: the job ids that entered (unique). A dead letter of an id outside it fails the
            check; pushes of other ids (a shared reply stream) are checked for duplicates only.
        reply_streams: the `reply_to` streams the jobs named; each id at least once on them,
            every push equal to the stored result.
        expect_pushed: the ids that must have been pushed (default: all, when streams given).
        max_missing_pushes: how many of those may lack a push (a crash between store and push).
        allow_dead: dead letters are allowed (each id at most one); else none at all.
        expect_status: every result not dead-lettered has this status (e.g. "ok").
    """
    assert len(set(ids)) == len(ids), "the ids given to the checker must be unique"
    deadline = time.monotonic() + timeout_s
    results = _wait_results(r, model, ids, deadline)
    _wait_idle(r, model, deadline)
    dead, dead_without_id = _check_dead_letters(r, model, set(ids), results, allow_dead)
    if expect_status is not None:
        wrong = {
            i: res for i, res in results.items() if res["status"] != expect_status and i not in dead
        }
        assert not wrong, (
            f"{len(wrong)} results are not {expect_status!r}: {_sample(wrong.values())}"
        )
    report = Report(results, dead, dead_without_id)
    if reply_streams:
        expected = list(ids if expect_pushed is None else expect_pushed)
        report.pushes, report.missing_pushes = _check_pushes(
            r, reply_streams, results, expected, max_missing_pushes, deadline
        )
    log.info("exactly-once check of %s: %s", model, report.summary())
    return report


def _wait_results(
    r: redis.Redis, model: str, ids: Sequence[str], deadline: float
) -> dict[str, dict[str, Any]]:
    missing = list(ids)
    found: dict[str, dict[str, Any]] = {}
    while True:
        raws = _mget(r, [result_key(model, i) for i in missing])
        for job_id, raw in zip(missing, raws, strict=True):
            if raw is not None:
                found[job_id] = orjson.loads(raw)
        missing = [i for i in missing if i not in found]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(missing)} of {len(ids)} jobs of {model} have no final result "
                f"(lost?): first {missing[:10]}"
            )
        time.sleep(0.2)
    wrong = [res for i, res in found.items() if res.get("id") != i or res.get("model") != model]
    assert not wrong, f"results stored under the wrong key: {_sample(wrong)}"
    unknown = [res for res in found.values() if res["status"] not in STATUSES]
    assert not unknown, f"results with an unknown status: {_sample(unknown)}"
    return {i: found[i] for i in ids}


def _mget(r: redis.Redis, keys: list[str]) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(keys), 1000):
        out += r.mget(keys[start : start + 1000])
    return out


def _wait_idle(r: redis.Redis, model: str, deadline: float) -> None:
    """Every lane: no entry pending (delivered, unacked), none undelivered."""
    while True:
        left = {key: n for key in lane_keys(model) if (n := _unfinished(r, key))}
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"entries left pending or undelivered: {left}")
        time.sleep(0.2)


def _unfinished(r: redis.Redis, key: str) -> int:
    if not r.exists(key):
        return 0
    groups = {_text(g["name"]): g for g in r.xinfo_groups(key)}
    group = groups.get(GROUP)
    if group is None:
        return int(r.xlen(key))  # nobody ever read this lane
    after = f"({_text(group['last-delivered-id'])}"
    undelivered: Any = r.xrange(key, min=after, max="+", count=1)
    return int(group["pending"]) + len(undelivered)


def _check_dead_letters(
    r: redis.Redis,
    model: str,
    ids: set[str],
    results: dict[str, dict[str, Any]],
    allow_dead: bool,
) -> tuple[dict[str, dict[str, str]], list[dict[str, str]]]:
    entries: Any = r.xrange(dead_key(model))
    letters = [{_text(k): _text(v) for k, v in fields.items()} for _, fields in entries]
    assert allow_dead or not letters, (
        f"{len(letters)} dead letters, none allowed: {_sample(d['reason'] for d in letters)}"
    )
    entries = Counter(d.get("entry_id") for d in letters)
    twice = [e for e, n in entries.items() if n > 1 or e is None]
    assert not twice, f"entries dead-lettered twice (or with no entry_id): {twice[:10]}"
    assert all(d.get("reason") for d in letters), "a dead letter without a reason"
    with_id = [d for d in letters if JOB_ID_RE.fullmatch(d.get("id", ""))]
    without_id = [d for d in letters if not JOB_ID_RE.fullmatch(d.get("id", ""))]
    per_id = Counter(d["id"] for d in with_id)
    twice = [i for i, n in per_id.items() if n > 1]
    assert not twice, f"ids dead-lettered twice: {twice[:10]}"
    strangers = [i for i in per_id if i not in ids]
    assert not strangers, f"dead letters of ids that never entered: {strangers[:10]}"
    dead = {d["id"]: d for d in with_id}
    wrong = [
        results[i]
        for i in dead
        if results[i]["status"] != "error" or results[i]["error"]["code"] != "dead_lettered"
    ]
    assert not wrong, f"dead-lettered jobs whose result is not `dead_lettered`: {_sample(wrong)}"
    return dead, without_id


def _check_pushes(
    r: redis.Redis,
    streams: Sequence[str],
    results: dict[str, dict[str, Any]],
    expected: Collection[str],
    max_missing: int,
    deadline: float,
) -> tuple[Counter[str], list[str]]:
    """Every push is the stored result of its id (repeats allowed, counted); at most
    `max_missing` of the expected ids unpushed. Waits briefly for pushes still in flight."""
    settle = min(deadline, time.monotonic() + 5.0)
    while True:
        bodies = [
            _text(fields[b"result"]) for stream in streams for _, fields in _xrange(r, stream)
        ]
        pushed = Counter(orjson.loads(b)["id"] for b in bodies)
        missing = [i for i in expected if not pushed[i]]
        if not missing or time.monotonic() > settle:
            break
        time.sleep(0.2)
    differ = [orjson.loads(b)["id"] for b in bodies if _differs(b, results)]
    assert not differ, f"pushed results that differ from the stored one: {differ[:10]}"
    assert len(missing) <= max_missing, (
        f"{len(missing)} ids never pushed to their reply stream (at most {max_missing} "
        f"allowed): first {missing[:10]}"
    )
    return pushed, missing


def _differs(body: str, results: dict[str, dict[str, Any]]) -> bool:
    pushed = orjson.loads(body)
    stored = results.get(pushed["id"])
    return stored is not None and pushed != stored


def _xrange(r: redis.Redis, key: str) -> list[Any]:
    entries: Any = r.xrange(key)
    return list(entries)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _sample(items: Iterable[Any], n: int = 3) -> list[Any]:
    return list(items)[:n]
