"""Tenants: producers that share a Redis and must not touch each other's jobs, nor the queue.

A tenant gets a Redis user of its own whose rights are exactly a tenant's submit, cancel and
wait (docs/security.md, "Tenants"): it pushes its jobs into its own inbox (`RPUSH`, which can
neither trim a list nor choose stream ids), reads its own results and reply streams, and
reads the lanes' lengths (numbers, never entries). Replicas move the inboxes into the lanes
(intake.py). This module writes those users and the tenant registry; `sluice tenants` is its
command line. It needs an admin connection (`ACL SETUSER`).
"""

from __future__ import annotations

import argparse
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from sluice.protocol import (
    MODELS_KEY,
    TENANTS_KEY,
    check_tenant,
    inbox_key,
    tenant_names,
    tenant_reply_prefix,
)
from sluice.settings import Settings

USER_PREFIX = "sluice-tenant-"


def user_name(tenant: str) -> str:
    return f"{USER_PREFIX}{check_tenant(tenant)}"


def acl_rules(tenant: str) -> list[str]:
    """A tenant's rights, after `reset on >password`. Every command the `sluice` functions
    run is checked against these too, so FCALL grants nothing beyond them."""
    t = check_tenant(tenant)
    return [
        # FCALL names its keys; the functions' own commands must each pass a selector below.
        "+fcall",
        "~sluice:*",
        # Its own inbox, and the bell that wakes the replicas: push only (no trim, no ids).
        f"(+rpush +llen ~sluice:{{*}}:inbox:{t})",
        "(+rpush +llen ~sluice:{*}:bell)",
        # The lanes' depth, for admission: numbers, never entries.
        "(+exists +xlen +xinfo|groups %R~sluice:{*}:jobs %R~sluice:{*}:jobs:*)",
        "(+exists +hget %R~sluice:{*}:info)",
        # Its own jobs' dedupe records and results: a cancel is a SET NX of the result.
        f"(+exists +get +set %RW~sluice:{{*}}:job:{t}:* %RW~sluice:{{*}}:result:{t}:*)",
        f"(+hincrby ~sluice:{{*}}:stats:{t})",
        f"(+exists +xread +del ~{tenant_reply_prefix(t)}*)",
    ]


def acl_setuser(tenant: str, password: str) -> list[str]:
    """The whole `ACL SETUSER` command for a tenant, as words."""
    return ["ACL", "SETUSER", user_name(tenant), "reset", "on", f">{password}", *acl_rules(tenant)]


@dataclass(frozen=True, slots=True)
class TenantInfo:
    name: str
    user: str
    has_user: bool
    queued: int  # elements in its inboxes, not yet moved into the lanes


def add(admin: redis.Redis, tenant: str, password: str | None = None) -> str:
    """Creates (or resets) the tenant's user and registers the tenant; returns the password."""
    password = password or secrets.token_hex(32)
    admin.execute_command(*acl_setuser(tenant, password))  # type: ignore[no-untyped-call]
    admin.sadd(TENANTS_KEY, tenant)
    return password


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _queued(admin: redis.Redis, tenant: str) -> int:
    models = sorted(_text(m) for m in admin.smembers(MODELS_KEY))
    with admin.pipeline(transaction=False) as pipe:
        for model in models:
            pipe.llen(inbox_key(model, tenant))
        return sum(int(n) for n in pipe.execute())


def key_patterns(tenant: str) -> list[str]:
    """Every key of a tenant, as SCAN patterns: inboxes, counters, dead streams, dedupe
    records, results, reply streams."""
    t = check_tenant(tenant)
    return [
        f"sluice:{{*}}:inbox:{t}",
        f"sluice:{{*}}:stats:{t}",
        f"sluice:{{*}}:dead:{t}",
        f"sluice:{{*}}:job:{t}:*",
        f"sluice:{{*}}:result:{t}:*",
        f"{tenant_reply_prefix(t)}*",
    ]


def remove(admin: redis.Redis, tenant: str, *, force: bool = False) -> int:
    """Deletes the tenant's user, unregisters it, and deletes its keys (so a tenant added
    later under the same name sees nothing of this one's); returns the jobs its inboxes
    still held.

    Without `force`, a tenant whose inboxes still hold jobs is kept (replicas move inboxes
    only of registered tenants: those jobs would wait forever). Its jobs already in the lanes
    still run; their results expire after `result_ttl_s`. An operator command: it SCANs."""
    queued = _queued(admin, check_tenant(tenant))
    if queued and not force:
        raise RuntimeError(
            f"tenant {tenant!r} still has {queued} jobs in its inboxes; start a replica to "
            "move them, or pass --force to drop the tenant anyway"
        )
    admin.execute_command("ACL", "DELUSER", user_name(tenant))  # type: ignore[no-untyped-call]
    admin.srem(TENANTS_KEY, tenant)
    for pattern in key_patterns(tenant):
        batch: list[Any] = []
        for key in admin.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                admin.delete(*batch)
                batch.clear()
        if batch:
            admin.delete(*batch)
    return queued


def listing(admin: redis.Redis) -> list[TenantInfo]:
    names = tenant_names(admin.smembers(TENANTS_KEY))
    users = {_text(u) for u in admin.execute_command("ACL", "USERS")}  # type: ignore[no-untyped-call]
    return [TenantInfo(t, user_name(t), user_name(t) in users, _queued(admin, t)) for t in names]


# -- `sluice tenants` ---------------------------------------------------------------------------


def add_command(sub: Any) -> None:
    """Adds `sluice tenants add|remove|list|acl` to the CLI's subcommands."""
    top = sub.add_parser(
        "tenants",
        help="producers with a Redis user of their own: add, remove, list, acl",
        description="A tenant submits into its own inbox and sees only its own jobs "
        "(docs/security.md, 'Tenants'). add/remove/list need an admin Redis URL.",
    )
    verbs = top.add_subparsers(required=True, metavar="ACTION")
    url_help = "an admin's URL (default: SLUICE_REDIS_URL or redis://127.0.0.1:6379/0)"

    def verb(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = verbs.add_parser(name, help=help)
        p.add_argument("--redis-url", help=url_help)
        p.set_defaults(func=func)
        return p

    add_p = verb("add", "create (or reset) a tenant's Redis user; print its URL", _cmd_add)
    add_p.add_argument("tenant", type=_tenant, help="name: [a-z0-9][a-z0-9-]{0,31}")
    add_p.add_argument("--password", help="default: 32 random bytes, hex")
    rm = verb(
        "remove", "delete a tenant's user and keys (refused while its inboxes hold jobs)", _cmd_rm
    )
    rm.add_argument("tenant", type=_tenant)
    rm.add_argument("--force", action="store_true", help="even with jobs in its inboxes")
    verb("list", "the tenants, whether each has its user, jobs in its inboxes", _cmd_list)
    acl = verbs.add_parser("acl", help="print a tenant's ACL SETUSER line (for users.acl files)")
    acl.add_argument("tenant", type=_tenant)
    acl.add_argument("--password", default="<password>", help="(default: a placeholder)")
    acl.set_defaults(func=_cmd_acl)


def _tenant(text: str) -> str:
    try:
        return check_tenant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _admin(args: argparse.Namespace, settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(args.redis_url or settings.redis_url, decode_responses=True)


def _cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    url = args.redis_url or settings.redis_url
    password = add(_admin(args, settings), args.tenant, args.password)
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user_name(args.tenant)}:{quote(password, safe='')}@{host}"
    netloc += f":{parts.port}" if parts.port else ""
    print(f"tenant {args.tenant} added; give its producers:")
    print(f"  SLUICE_REDIS_URL={urlunsplit(parts._replace(netloc=netloc))}")
    print(f"  SLUICE_TENANT={args.tenant}")
    return 0


def _cmd_rm(args: argparse.Namespace, settings: Settings) -> int:
    dropped = remove(_admin(args, settings), args.tenant, force=args.force)
    note = f" ({dropped} queued jobs dropped)" if dropped else ""
    print(f"tenant {args.tenant} removed{note}")
    return 0


def _cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = listing(_admin(args, settings))
    if not rows:
        print("no tenants (sluice tenants add NAME)")
    for row in rows:
        user = row.user if row.has_user else f"{row.user} (missing: run add again)"
        print(f"{row.name}  user {user}  in inboxes {row.queued}")
    return 0


def _cmd_acl(args: argparse.Namespace, settings: Settings) -> int:
    print(" ".join(acl_setuser(args.tenant, args.password)))
    return 0
