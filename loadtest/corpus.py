"""The benchmark workload: deterministic English-like sentences of about 14 words."""

from __future__ import annotations

import random

WORDS = """the a man woman child dog cat city river road house car train bike phone book letter
music song film game team player coach doctor teacher student market price bank money water
coffee bread food garden tree flower storm rain sun night morning week year people family friend
quickly slowly often never always again together almost really early late far near small large
old new young happy quiet loud bright dark warm cold green blue red heavy light long short busy
runs walks reads writes plays eats drinks builds opens closes carries finds keeps sells buys
watches holds brings sends leaves meets tells asks helps learns teaches sings paints drives
with under over across through near behind during after before from into along around beside
and but because while when where although since so then""".split()


def sentences(n: int, seed: int = 1234) -> list[str]:
    """Deterministic ~14-word sentences (12 to 16 words)."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 16))).capitalize() + "."
        for _ in range(n)
    ]
