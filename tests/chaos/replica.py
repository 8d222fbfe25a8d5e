"""One replica as a process of its own, for the chaos campaign to SIGKILL, SIGSTOP and restart:
the same `Worker` pipeline a Serve replica runs (sluice.replica wraps it), without Ray, so a
kill takes a process and nothing respawns it but the campaign.

    python -m tests.chaos.replica --url URL --model M --path P [--task generate] ...

SIGTERM or SIGINT stops it cleanly (finish what was pulled, write, leave the group).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from typing import Any

from sluice.queue import StreamQueue, connect
from sluice.runners import build_runner
from sluice.runners.base import Progress
from sluice.runners.generate import GenerateRunner
from sluice.settings import ModelSettings, QueueSettings
from sluice.worker import Worker

log = logging.getLogger("chaos.replica")


class SlowGenerator(GenerateRunner):
    """The real generation runner, each step `step_delay_s` slower: a tiny model's jobs then
    run for several visibility timeouts, as a real LLM's long answers do."""

    step_delay_s = 0.0

    def step(self) -> list[Progress]:
        time.sleep(self.step_delay_s)
        return super().step()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", required=True, help="Redis URL (the fault proxy's)")
    p.add_argument("--model", required=True, help="model name M")
    p.add_argument("--path", required=True, help="model folder")
    p.add_argument("--task", default="embed", choices=["embed", "generate"])
    p.add_argument("--consumer", required=True, help="consumer name in the group")
    p.add_argument("--queue", default="{}", help="QueueSettings as JSON")
    p.add_argument("--step-delay-s", type=float, default=0.0, help="generate: per-step delay")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    import orjson

    settings = ModelSettings(
        name=args.model,
        model_path=args.path,
        task=args.task,
        torch_threads=1,
        dtype="fp32",
        max_batch_size=16,
        max_new_tokens=256,
    )
    runner: Any
    if args.task == "generate":
        runner = SlowGenerator(settings)
        runner.step_delay_s = args.step_delay_s
    else:
        runner = build_runner(settings)
    runner.load()
    limits = QueueSettings(**orjson.loads(args.queue))
    redis = connect(args.url, socket_timeout=5)
    worker = Worker(StreamQueue(redis, args.model, args.consumer, limits), runner, settings, limits)
    worker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await worker.stop(20)
    await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(parse(argv)))


if __name__ == "__main__":
    main()
