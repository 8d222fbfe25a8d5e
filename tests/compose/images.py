"""The images of `make compose-test`, made on a machine where no image registry is reachable.

- The base, `sluice-compose-test/base:bookworm`: Debian bookworm made with `debootstrap`
  (minbase, plus python3, python3-venv, ca-certificates) and `docker import`ed, with a venv on
  PATH at /opt/venv. It stands in for `python:3.11.13-slim-bookworm`: `python` and `pip` on
  PATH, pip free to install (the venv, not Debian's externally managed python). Bookworm's
  python3 is 3.11, as in the production image. Made once; skipped while the daemon has it.
- Sluice's image, from the production Dockerfile itself, with only its `FROM` line swapped for
  that base (the copy is written to the cache folder). Its torch step installs the CPU build
  of torch 2.13.0, the one the Makefile installs, from a wheelhouse that pip fills on this
  machine and that a loopback HTTP server offers as the build's TORCH_INDEX: PyTorch's own
  index is not reachable here, and PyPI's torch is a CUDA build of several GB. Everything else
  comes from PyPI, as in any build of the Dockerfile.
- Redis and Prometheus: Debian's redis-server (7.0) and prometheus (2.42) on the base
  (docker/compose-test/*.Dockerfile), for redis:7.2.7 and prom/prometheus:v2.55.1.

Builds use the classic builder (DOCKER_BUILDKIT=0): BuildKit would fetch the Dockerfile's
`# syntax=docker/dockerfile:1` frontend from Docker Hub. They run on the host's network, so
that apt and pip reach their registries, and the wheelhouse server listens on 127.0.0.1 only.

The production Dockerfile keeps its literal, pinned `FROM python:3.11.13-slim-bookworm`
(tests/unit/test_compose.py checks the pin; an `ARG` in `FROM` would hide it from that check and
from tools that track base images), hence the rewritten copy rather than a build argument.

Caches, in .cache/compose-test/ (gitignored; all of it can go, the next run remakes it): the
debootstrap root filesystem and the wheelhouse.
"""

from __future__ import annotations

import contextlib
import functools
import html
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "compose-test"
HERE = ROOT / "docker" / "compose-test"

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
TORCH = "torch==2.13.0+cpu"  # the Makefile's torch==2.13.0, which this machine's pip takes as +cpu
PRODUCTION_BASE = "python:3.11.13-slim-bookworm"
INDEX_PORT = 28111  # the wheelhouse's, on loopback (serve_index)

BASE = "sluice-compose-test/base:bookworm"
SLUICE = "sluice-compose-test/sluice:0.1.0"
REDIS = "sluice-compose-test/redis:7.0"
PROMETHEUS = "sluice-compose-test/prometheus:2.42"
IMAGES = (BASE, SLUICE, REDIS, PROMETHEUS)

# The venv first on PATH: `python` and `pip` are the venv's, as python:slim's are /usr/local's.
# PIP_CERT: pip trusts the system's CA bundle (with the host's local CAs, below) rather than
# its own, so that a TLS-inspecting proxy that the host trusts is trusted in the build too.
BASE_CHANGES = (
    "ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
    'CMD ["python"]',
)
SOURCES = f"""\
deb {MIRROR} {SUITE} main
deb {MIRROR} {SUITE}-updates main
deb {MIRROR}-security {SUITE}-security main
"""


def say(message: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(
    *command: str,
    stdin: IO[bytes] | None = None,
    stdout: int | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Runs a command with its output on this terminal (the progress of long steps)."""
    subprocess.run(command, check=True, stdin=stdin, stdout=stdout, env=env)


def image_exists(tag: str) -> bool:
    done = subprocess.run(
        ["docker", "image", "inspect", tag], capture_output=True, text=True, check=False
    )
    return done.returncode == 0


def build_env() -> dict[str, str]:
    return {**os.environ, "DOCKER_BUILDKIT": "0"}


# --- the base -----------------------------------------------------------------------------


def make_rootfs(rootfs: Path) -> None:
    """debootstrap into `rootfs` (a half-made one from an interrupted run is made again)."""
    done = rootfs / ".sluice-complete"
    if done.exists():
        say(f"reusing the root filesystem in {rootfs}")
        return
    if rootfs.exists():
        shutil.rmtree(rootfs)
    say(f"debootstrap {SUITE} into {rootfs} (about a minute)")
    run(
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(rootfs),
        MIRROR,
    )
    (rootfs / "etc/apt/sources.list").write_text(SOURCES)
    # The host's own CAs (Debian's place for them): a proxy the host trusts is trusted inside.
    local_cas = Path("/usr/local/share/ca-certificates")
    if local_cas.is_dir() and any(local_cas.rglob("*.crt")):
        shutil.copytree(local_cas, rootfs / local_cas.relative_to("/"), dirs_exist_ok=True)
    run("chroot", str(rootfs), "update-ca-certificates", stdout=subprocess.DEVNULL)
    run("chroot", str(rootfs), "python3", "-m", "venv", "/opt/venv")
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / leftover).glob("*"):
            if path.is_file():
                path.unlink()
    done.touch()


def ensure_base() -> bool:
    """Makes the base image unless the daemon has it; True if it was made."""
    if image_exists(BASE):
        say(f"{BASE}: in the daemon already")
        return False
    rootfs = CACHE / "rootfs"
    make_rootfs(rootfs)
    say(f"docker import {BASE}")
    changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
    tar = subprocess.Popen(
        ["tar", "-C", str(rootfs), "--exclude=./.sluice-complete", "-c", "."],
        stdout=subprocess.PIPE,
    )
    try:
        run("docker", "import", *changes, "-", BASE, stdin=tar.stdout, stdout=subprocess.DEVNULL)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
    return True


# --- torch's wheelhouse, offered as a package index on loopback -------------------------------


def normalized(name: str) -> str:
    """A project's name as a simple index spells its folder (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def fill_wheelhouse(wheels: Path) -> None:
    """torch's CPU build and its dependencies, at docker/constraints.txt's versions, as pip on
    this machine finds them (it has the CPU build the Makefile installs)."""
    wheels.mkdir(parents=True, exist_ok=True)
    say(f"pip download {TORCH} and its dependencies into {wheels}")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--only-binary=:all:",
        "--constraint",
        str(ROOT / "docker" / "constraints.txt"),
        "--dest",
        str(wheels),
        TORCH,
    ]
    if subprocess.run(command, check=False).returncode != 0:
        raise RuntimeError(
            f"pip found no {TORCH}: the image takes torch's CPU build, never PyPI's CUDA one. "
            "Add PyTorch's CPU index to pip (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/"
            "whl/cpu) or put the wheel in a folder of PIP_FIND_LINKS."
        )


def write_index(wheels: Path) -> Path:
    """A PEP 503 simple index of the wheels in `wheels`: simple/<project>/index.html."""
    simple = wheels / "simple"
    shutil.rmtree(simple, ignore_errors=True)
    by_project: dict[str, list[str]] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        by_project.setdefault(normalized(wheel.name.split("-")[0]), []).append(wheel.name)
    for project, files in by_project.items():
        links = "\n".join(
            f'<a href="../../{quote(name)}">{html.escape(name)}</a><br>' for name in files
        )
        (simple / project).mkdir(parents=True)
        (simple / project / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}\n")
    return simple


@contextlib.contextmanager
def serve_index(wheels: Path) -> Iterator[str]:
    """The wheelhouse over HTTP on 127.0.0.1, for the build's TORCH_INDEX. On INDEX_PORT when
    it is free: the URL is a build argument, and a new one would miss the build cache of every
    step after the Dockerfile's `ARG TORCH_INDEX`."""
    handler = functools.partial(_QuietHandler, directory=str(wheels))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


# --- the images ---------------------------------------------------------------------------


def sluice_dockerfile() -> Path:
    """The production Dockerfile with its FROM line swapped for the base, in the cache."""
    text = (ROOT / "Dockerfile").read_text()
    swapped, count = re.subn(
        rf"^FROM {re.escape(PRODUCTION_BASE)}$", f"FROM {BASE}", text, flags=re.MULTILINE
    )
    if count != 1:
        raise RuntimeError(f"the Dockerfile has no line `FROM {PRODUCTION_BASE}` to swap")
    path = CACHE / "Dockerfile.sluice"
    path.write_text(
        f"# Written by tests/compose/images.py from ./Dockerfile: FROM {BASE}\n{swapped}"
    )
    return path


def build(tag: str, dockerfile: Path, context: Path, *build_args: str) -> None:
    say(f"docker build {tag}")
    args = [arg for build_arg in build_args for arg in ("--build-arg", build_arg)]
    run(
        "docker",
        "build",
        "--network",
        "host",
        "--tag",
        tag,
        "--file",
        str(dockerfile),
        *args,
        str(context),
        env=build_env(),
    )


def build_all() -> dict[str, float]:
    """Builds the four images (the base only if missing); seconds each took."""
    CACHE.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = time.monotonic()
    made = ensure_base()
    times["base" if made else "base (cached)"] = time.monotonic() - start

    wheels = CACHE / "wheels"
    start = time.monotonic()
    fill_wheelhouse(wheels)
    write_index(wheels)
    times["wheelhouse"] = time.monotonic() - start

    base_arg = f"BASE={BASE}"
    with serve_index(wheels) as index:
        start = time.monotonic()
        build(SLUICE, sluice_dockerfile(), ROOT, f"TORCH_INDEX={index}")
        times["sluice"] = time.monotonic() - start
    for tag, name in ((REDIS, "redis"), (PROMETHEUS, "prometheus")):
        start = time.monotonic()
        build(tag, HERE / f"{name}.Dockerfile", HERE, base_arg)
        times[name] = time.monotonic() - start
    return times


if __name__ == "__main__":  # python -m tests.compose.images: the builds alone
    for step, seconds in build_all().items():
        say(f"{step}: {seconds:.0f} s")
