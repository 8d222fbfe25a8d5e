"""The ACL lines of docs/security.md, read from its ```redis blocks, so docs and tests agree.

The tests' redis-server applies exactly these lines (passwords filled in), and the replicas and
SDK clients of the tests connect as the users they create.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "security.md"
WORKER = "sluice-worker"
PRODUCER = "sluice-producer"
SCALER = "sluice-scaler"
#: user -> the placeholder that stands for its password in the docs.
PLACEHOLDERS = {
    WORKER: "<worker-password>",
    PRODUCER: "<producer-password>",
    SCALER: "<scaler-password>",
}
_BLOCK = re.compile(r"^```redis\n(.*?)^```", re.DOTALL | re.MULTILINE)


def doc_acl_lines(passwords: Mapping[str, str], doc: Path = DOC) -> list[str]:
    """Every command of the doc's ```redis blocks, in order, with the passwords filled in."""
    lines = [
        line.strip()
        for block in _BLOCK.findall(doc.read_text())
        for line in block.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise ValueError(f"no ```redis blocks in {doc}")
    for line in lines:
        words = line.split()
        if words[:2] != ["ACL", "SETUSER"] or words[2] not in PLACEHOLDERS:
            raise ValueError(
                f"a ```redis line of {doc.name} that is not ACL SETUSER of "
                f"{sorted(PLACEHOLDERS)}: {line!r}"
            )
    text = "\n".join(lines)
    for user, placeholder in PLACEHOLDERS.items():
        if placeholder not in text:
            raise ValueError(f"{doc.name} sets no password {placeholder} for {user}")
        text = text.replace(placeholder, passwords[user])
    return text.splitlines()
