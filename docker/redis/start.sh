#!/bin/sh
# Starts redis-server for the compose stack: writes the ACL file from users.acl.template (beside
# this script) with the SHA-256 of each password from the environment, then hands over to the
# image's entrypoint, which drops root for the `redis` user.
#
#   start.sh                       # in the redis:7.2 container (docker-compose.yml)
#   start.sh --render-only FILE    # write the ACL file to FILE and stop (the tests use this)
set -eu

here=$(dirname "$0")
: "${REDIS_ADMIN_PASSWORD:?is not set}" "${SLUICE_WORKER_PASSWORD:?is not set}"
: "${SLUICE_PRODUCER_PASSWORD:?is not set}" "${SLUICE_SCALER_PASSWORD:?is not set}"

sha256() { printf '%s' "$1" | sha256sum | cut -d ' ' -f 1; }

render() {
    # Only the hashes (hex digits) are substituted: nothing in a password can break the file.
    # `default` stays off and has no password, so no client can be it, but it gets every right:
    # Redis replays the AOF at start as `default`, and EXEC re-checks that user's rights
    # (redis/redis#14541: Debian 12's 7.0.15 has the bug, and redis:7.2.7 predates its fix).
    # With none, every transaction in the AOF is dropped, silently: the writes of each script
    # and function (an admitted job's XADD, a pull's XCLAIMs, a reply push), so a restart would
    # lose them. `make compose-test` restarts the stack and checks that nothing is lost.
    sed -e 's/^user default off$/user default off ~* \&* +@all/' \
        -e "s/@REDIS_ADMIN_PASSWORD_SHA256@/$(sha256 "$REDIS_ADMIN_PASSWORD")/" \
        -e "s/@SLUICE_WORKER_PASSWORD_SHA256@/$(sha256 "$SLUICE_WORKER_PASSWORD")/" \
        -e "s/@SLUICE_PRODUCER_PASSWORD_SHA256@/$(sha256 "$SLUICE_PRODUCER_PASSWORD")/" \
        -e "s/@SLUICE_SCALER_PASSWORD_SHA256@/$(sha256 "$SLUICE_SCALER_PASSWORD")/" \
        -e '/^#/d' "$here/users.acl.template" > "$1"
}

if [ "${1:-}" = "--render-only" ]; then
    render "${2:?usage: start.sh --render-only FILE}"
    exit 0
fi

acl=/tmp/users.acl    # in the container only, never on the data volume
(umask 077 && render "$acl")
chown redis:redis "$acl"
exec docker-entrypoint.sh redis-server "$here/redis.conf" \
    --aclfile "$acl" --maxmemory "${REDIS_MAXMEMORY:-2gb}"
