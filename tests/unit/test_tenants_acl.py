"""A tenant's Redis rights: docs/security.md shows exactly what `sluice tenants add` runs."""

from __future__ import annotations

import re

import pytest

from sluice import tenants
from tests.acl_docs import DOC


def test_the_doc_shows_the_acl_line_the_code_runs() -> None:
    shown = re.findall(r"^ACL SETUSER sluice-tenant-team-a .*$", DOC.read_text(), re.M)
    assert shown == [" ".join(tenants.acl_setuser("team-a", "<password>"))]


def test_a_tenant_gets_no_write_to_the_lanes_and_only_its_own_keys() -> None:
    rules = " ".join(tenants.acl_rules("team-b"))
    assert (
        "xadd" not in rules
        and "xtrim" not in rules
        and "xread " not in rules.replace("+xread +del ~sluice:reply:team-b:*", "")
    )
    # Every pattern that grants a write names the tenant, but the bell (push only).
    for selector in re.findall(r"\(([^)]*)\)", rules):
        writes = [w for w in selector.split() if w.startswith(("~", "%W~", "%RW~"))]
        if any(c in selector.split() for c in ("+set", "+rpush", "+del", "+hincrby")):
            assert all("team-b" in w or w.endswith(":bell") for w in writes), selector


@pytest.mark.parametrize("name", ["", "Team", "a:b", "a}b", "a*", "-a", "x" * 33])
def test_tenant_names_that_could_escape_their_keys_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="tenant name"):
        tenants.acl_rules(name)
