"""Server-side scripts: one `.lua` file per atomic step, loaded from this folder at import.

Each file is named for its step and the number of keys it takes (`dead_letter-3.lua`; `-n` when
the count depends on the batch), as BullMQ names its commands, so a reader finds a step by its
file and the tests load and run the very file the replica runs. A line `--@include <name>` is
replaced by `include/<name>.lua`: fragments are shared, never copied.

Each script names every key it touches in KEYS, and a model's keys share the `{M}` hash tag, so
all of them run on Redis Cluster too (a reply stream is a key of its own, in its own slot).
Every script costs O(batch): none scans a stream or the keyspace.

`library.lua` is the producer side, a Redis Function library (`sluice_submit`, and
`sluice_enqueue` for tenants), loaded by the
replicas; `LIBRARY_VERSION` is bumped whenever it changes, so replicas replace an older one.
"""

from __future__ import annotations

import re
from importlib import resources

_INCLUDE = re.compile(r"^--@include (\w+)$", re.M)


def source(name: str) -> str:
    """The text of `<name>.lua` in this folder, its includes expanded."""
    text = resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: source(f"include/{m.group(1)}").rstrip("\n"), text)


#: Bumped whenever library.lua changes, so replicas replace an older library they find.
LIBRARY_VERSION = "4"

PULL = source("pull-3")
PUSH_REPLY = source("push_reply-1")
PUSH_TOKEN = source("push_token-1")
DEAD_LETTER = source("dead_letter-3")
TRIM = source("trim-1")
REPLAY = source("replay-4")
RECLAIM = source("reclaim-2")
RENEW = source("renew-1")
HEARTBEAT = source("heartbeat-1")
ADMIT = source("admit-n")
LIBRARY = f"#!lua name=sluice\nlocal VERSION = '{LIBRARY_VERSION}'\n" + source("library")
