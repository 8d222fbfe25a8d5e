"""The chaos campaign (`make chaos`): a seeded, randomized schedule of faults against a real
local stack (redis-server with AOF, replica processes behind a fault proxy, producers that
misbehave), judged by the exactly-once checker. See docs/semantics.md."""
