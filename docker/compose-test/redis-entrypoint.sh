#!/bin/sh
# The official redis image's docker-entrypoint.sh, as far as docker/redis/start.sh uses it: run
# as root, it gives /data to the `redis` user and drops root (setpriv, of util-linux, instead of
# the official image's gosu), then runs the command.
set -eu
if [ "${1:-}" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find /data \! -user redis -exec chown redis:redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
