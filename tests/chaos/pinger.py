"""PING latency of a Redis, sampled from a process of its own (so the campaign's threads
cannot delay the samples): one line per answered PING, `<unix ms> <latency ms>`.

    python -m tests.chaos.pinger --port P --out FILE [--interval-ms 20]
"""

from __future__ import annotations

import argparse
import time

import redis


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--interval-ms", type=float, default=20.0)
    args = p.parse_args(argv)
    client = redis.Redis(port=args.port, socket_timeout=2, socket_connect_timeout=1)
    with open(args.out, "a", buffering=1) as out:
        while True:
            start = time.perf_counter()
            try:
                client.ping()
            except redis.RedisError:
                time.sleep(0.1)  # down (a kill -9 of the campaign's): no sample
                continue
            latency_ms = (time.perf_counter() - start) * 1000
            out.write(f"{time.time() * 1000:.0f} {latency_ms:.3f}\n")
            time.sleep(args.interval_ms / 1000)


if __name__ == "__main__":
    main()
