#!/bin/bash
# `make compose-test`: docker-compose.yml's stack built and run on this machine, then checked
# (tests/compose/test_compose_stack.py; the images: tests/compose/images.py).
#
#   docker/compose-test/run.sh [PYTHON]     # PYTHON: the venv's, with pytest (.venv/bin/python)
#
# What it needs beyond `make install`, it sets up itself: Debian's docker.io and debootstrap
# (apt-get, as `make system-deps` installs its packages), and a Docker daemon. If none answers,
# it starts dockerd and stops it again at the end; a daemon that was running is left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${1:-.venv/bin/python}
began=$SECONDS
sudo=$([ "$(id -u)" = 0 ] || echo sudo)
cache=.cache/compose-test
mkdir -p "$cache"

missing=()
for pair in docker:docker.io dockerd:docker.io debootstrap:debootstrap docker-compose:docker-compose; do
    command -v "${pair%%:*}" >/dev/null || PATH=$PATH:/usr/sbin:/sbin command -v "${pair%%:*}" \
        >/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
    echo "installing $packages with apt-get"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        $packages >/dev/null
fi
export PATH=$PATH:/usr/sbin:/sbin   # debootstrap and dockerd live there

dockerd_pid=
stop_dockerd() {
    if [ -n "$dockerd_pid" ]; then
        echo "stopping the dockerd this run started (pid $dockerd_pid)"
        $sudo kill -TERM "$dockerd_pid" 2>/dev/null || true
        for _ in $(seq 60); do $sudo kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
    fi
}
trap stop_dockerd EXIT
if ! $sudo docker info >/dev/null 2>&1; then
    echo "no Docker daemon answers: starting dockerd (log: $cache/dockerd.log)"
    $sudo dockerd >"$cache/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 120); do $sudo docker info >/dev/null 2>&1 && break; sleep 0.5; done
    $sudo docker info >/dev/null 2>&1 || { echo "dockerd did not start:"; tail -20 "$cache/dockerd.log"; exit 1; }
fi
if ! docker info >/dev/null 2>&1; then
    echo "this user cannot reach the Docker daemon: add it to the docker group, or run as root" >&2
    exit 1
fi

status=0
SLUICE_COMPOSE_TEST=1 HF_HUB_OFFLINE=1 "$python" -m pytest -s -v -p no:cacheprovider \
    tests/compose || status=$?
echo "make compose-test: $(( (SECONDS - began) / 60 )) min $(( (SECONDS - began) % 60 )) s in all"
exit $status
