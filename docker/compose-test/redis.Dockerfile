# Redis for `make compose-test` (docker/compose-test/README.md): Debian bookworm's redis-server
# (7.0) on the locally made base, since redis:7.2.7 cannot be pulled where no image registry is
# reachable. docker-compose.yml runs docker/redis/start.sh in it unchanged: the ACL users of
# docs/security.md (selectors, %R~/%W~ key rights and +fcall are all Redis 7.0), AOF, noeviction.
ARG BASE
FROM ${BASE}

# /data as in the official image: the AOF's directory, owned by the `redis` user that the
# package creates (a fresh named volume takes this ownership).
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data

# start.sh ends with `exec docker-entrypoint.sh redis-server ...`, the official image's
# entrypoint, which drops root for `redis`; this one does the same.
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
