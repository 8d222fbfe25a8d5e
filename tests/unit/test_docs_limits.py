"""docs/protocol.md against the code: every limit with its default, every error code, the
protocol's fixed names and patterns. No Redis, no Ray: the docs cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import annotated_types
import pytest
from pydantic import BaseModel

from sluice import errors, protocol
from sluice.settings import MODEL_NAME_RE, ModelSettings, QueueSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
BATCHING_FIELDS = (
    "max_batch_size",
    "max_wait_ms",
    "max_batch_tokens",
    "prefetch_batches",
    "max_length",
    "truncate",
    "torch_threads",
)
SETTINGS: dict[str, tuple[type[BaseModel], str]] = {
    **{f"queue.{name}": (QueueSettings, name) for name in QueueSettings.model_fields},
    **{f"model.{name}": (ModelSettings, name) for name in BATCHING_FIELDS},
}


def doc_text() -> str:
    return DOC.read_text()


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header cells, body rows) of every Markdown table, cells stripped; `\\|` is a literal."""
    found: list[tuple[list[str], list[list[str]]]] = []
    block: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            block.append([c.strip().replace("\\|", "|") for c in cells])
            continue
        if len(block) >= 2 and all(set(c) <= set("-: ") for c in block[1]):
            found.append((block[0], block[2:]))
        block = []
    return found


def table(text: str, *headers: str) -> dict[str, dict[str, str]]:
    """The one table whose header starts with `headers`: first cell -> row by header."""
    n = len(headers)
    matches = [(h, rows) for h, rows in tables(text) if [c.lower() for c in h[:n]] == [*headers]]
    assert len(matches) == 1, f"want one table headed {headers}, found {len(matches)}"
    header, rows = matches[0]
    return {unquote(row[0]): dict(zip(header, row, strict=True)) for row in rows}


def unquote(cell: str) -> str:
    return cell.strip().strip("`").strip()


def number(text: str) -> float:
    if text in ("true", "false"):
        return float(text == "true")
    return float(text.replace("_", "").replace(",", ""))


def doc_default(cell: str) -> Any:
    """The default a cell states: its first `code` span, a number; or `unset` for None."""
    if cell.lower().startswith("unset"):
        return None
    span = re.match(r"`([^`]+)`", cell)
    assert span, f"a default starts with `value` or `unset`: {cell!r}"
    return number(span.group(1))


def bounds_text(model: type[BaseModel], name: str) -> str:
    """The `allowed` cell the field's constraints call for, e.g. `≥ 1, ≤ 60000`."""
    parts = []
    for item in model.model_fields[name].metadata:
        if isinstance(item, annotated_types.Ge):
            parts.append(f"≥ {item.ge}")
        elif isinstance(item, annotated_types.Gt):
            parts.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Le):
            parts.append(f"≤ {item.le}")
        elif isinstance(item, annotated_types.Lt):
            parts.append(f"< {item.lt}")
    if model.model_fields[name].annotation is bool:
        return "`true`, `false`"
    return ", ".join(parts) or "any"


@pytest.fixture(scope="module")
def limits() -> dict[str, dict[str, str]]:
    return table(doc_text(), "setting")


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_limit_is_documented_with_its_default(limits, setting):
    model, name = SETTINGS[setting]
    assert setting in limits, f"docs/protocol.md's limits table lacks `{setting}`"
    row = limits[setting]
    default = model.model_fields[name].default
    stated = doc_default(row["default"])
    if default is None:
        assert stated is None, f"`{setting}` has no default in the code; the doc says {stated}"
    else:
        assert stated == pytest.approx(float(default)), (
            f"`{setting}` defaults to {default} in the code, {row['default']!r} in the doc"
        )
    assert row["allowed"].replace("_", "") == bounds_text(model, name), setting
    assert f"args.{setting}" in row["Serve YAML"], setting
    if model is QueueSettings:
        assert f"SLUICE_QUEUE__{name.upper()}" in row["env var"], setting
    else:
        assert "SLUICE_" not in row["env var"], f"`{setting}` is not read from the environment"


def test_limits_table_lists_only_real_settings(limits):
    stale = sorted(set(limits) - set(SETTINGS))
    assert not stale, f"the limits table names settings the code does not have: {stale}"


def test_error_table_matches_errors_TABLE():
    rows = table(doc_text(), "code")
    assert set(rows) == set(errors.TABLE), (
        f"missing: {sorted(set(errors.TABLE) - set(rows))}, "
        f"unknown: {sorted(set(rows) - set(errors.TABLE))}"
    )
    for code, spec in errors.TABLE.items():
        row = rows[code]
        assert int(row["HTTP"]) == spec.http_status, code
        assert row["retryable"] == ("yes" if spec.retryable else "no"), code
        assert row["meaning"], code


def test_fixed_names_and_patterns_are_documented():
    text = doc_text()
    patterns = [MODEL_NAME_RE, protocol.JOB_ID_RE, protocol.REPLY_TO_RE]
    for pattern in patterns:
        bare = pattern.pattern.removeprefix("^").removesuffix("$")
        assert f"`{bare}`" in text, f"the pattern {bare} is not in docs/protocol.md"
    for key in (
        protocol.jobs_key("M"),
        protocol.result_key("M", "<id>"),
        protocol.dead_key("M"),
        protocol.GROUP,
    ):
        assert f"`{key}`" in text, key
    for status in protocol.STATUSES:
        assert f"`{status}`" in text, status


def test_result_timings_are_documented():
    from sluice.batching import Batch
    from sluice.runners.base import Encoded
    from sluice.running import Ran

    job = protocol.Job(entry_id="1-0", id="j", input={}, params={})
    keys = Ran(Batch([]), [], 0.0, 1.0)._timings(Encoded(job, 3, None))
    rows = table(doc_text(), "key", "meaning")
    assert set(keys) <= set(rows), f"timings not in the doc: {sorted(set(keys) - set(rows))}"
