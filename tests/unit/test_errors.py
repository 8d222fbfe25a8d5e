"""One table: every code maps to one exception, one HTTP status, one retryable flag."""

from __future__ import annotations

import pytest

from sluice.client import raise_for_status
from sluice.errors import BY_CODE, TABLE, InvalidInput, SluiceError, from_wire
from sluice.protocol import Result


def test_codes_are_unique_and_documented():
    assert set(BY_CODE) == set(TABLE)
    for code, spec in TABLE.items():
        assert spec.summary, code
        assert 400 <= spec.http_status < 600


@pytest.mark.parametrize("code", sorted(BY_CODE))
def test_from_wire_gives_the_typed_error(code):
    err = from_wire(code, "msg", job_id="j")
    assert type(err) is BY_CODE[code]
    assert (err.code, err.message, err.job_id) == (code, "msg", "j")


def test_unknown_code_is_still_a_sluice_error():
    err = from_wire("brand_new", "m")
    assert type(err) is SluiceError and "brand_new" in str(err)


def test_raise_for_status():
    assert raise_for_status(Result("a", "m", "ok", output=[1.0])).ok
    with pytest.raises(InvalidInput, match="bad"):
        raise_for_status(
            Result("a", "m", "error", error={"code": "invalid_input", "message": "bad"})
        )
    for status in ("expired", "cancelled"):
        with pytest.raises(SluiceError) as info:
            raise_for_status(Result("a", "m", status))
        assert info.value.code == status
