"""The Redis scripts as files: named for their step and key count, includes expanded."""

from __future__ import annotations

import re
from importlib import resources

from sluice import scripts

NAME = re.compile(r"^[a-z_]+-(\d+|n)\.lua$")


def lua_files() -> list[str]:
    folder = resources.files("sluice.scripts")
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".lua"))


def test_every_step_is_named_for_its_step_and_key_count() -> None:
    steps = [name for name in lua_files() if name != "library.lua"]
    assert steps, "no scripts found"
    for name in steps:
        assert NAME.fullmatch(name), name


def test_key_counts_match_the_keys_each_script_reads() -> None:
    for name in lua_files():
        match = NAME.fullmatch(name)
        if match is None or match.group(1) == "n":
            continue
        text = scripts.source(name.removesuffix(".lua"))
        if "ipairs(KEYS)" in text:
            continue  # iterates over whatever keys it is given (the lanes)
        used = {int(k) for k in re.findall(r"KEYS\[(\d+)\]", text)}
        assert used == set(range(1, int(match.group(1)) + 1)), (name, sorted(used))


def test_includes_are_expanded() -> None:
    assert "--@include" not in scripts.TRIM
    assert "local function id_lt" in scripts.TRIM


def test_the_library_carries_its_version() -> None:
    assert scripts.LIBRARY.startswith("#!lua name=sluice\n")
    assert f"local VERSION = '{scripts.LIBRARY_VERSION}'" in scripts.LIBRARY
