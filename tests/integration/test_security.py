"""Redis AUTH, the least-privilege users of docs/security.md, and TLS, against real redis-servers.

Replicas connect as `sluice-worker`, SDK clients as `sluice-producer`; the ACL lines are the
docs' own (tests/acl_docs.py). The TLS server gets a CA and a certificate made here, with openssl.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import AuthenticationError, NoPermissionError

from sluice import Client, UnknownModel
from sluice.protocol import dead_key, jobs_key, result_key
from sluice.stack import RedisServer, TlsFiles
from tests.acl_docs import DOC, PRODUCER, SCALER, WORKER, doc_acl_lines
from tests.conftest import PASSWORDS
from tests.helpers import dead_letters, group_pending, wait_for

pytestmark = pytest.mark.integration


def refused(client: redis.Redis, *command: str) -> bool:
    try:
        client.execute_command(*command)
    except NoPermissionError:
        return True
    return False


def test_the_redis_conf_form_grants_the_same_rights():
    """docs/security.md shows each user twice (ACL SETUSER, and redis.conf): the same rights."""

    def rights(words: list[str]) -> set[str]:
        # Root rules as words; each selector, `(...)`, as one rule.
        text = " ".join(words)
        selectors = re.findall(r"\([^)]*\)", text)
        root = re.sub(r"\([^)]*\)", " ", text).split()
        return {w for w in root if w[0] in "~+-&%"} | set(selectors)

    conf = re.search(r"^```conf\n(.*?)^```", DOC.read_text(), re.DOTALL | re.MULTILINE)
    assert conf, "no ```conf block in docs/security.md"
    in_conf = {w[1]: rights(w) for line in conf[1].splitlines() if (w := line.split())}
    in_acl = {
        w[2]: rights(w) for line in doc_acl_lines(PASSWORDS) if (w := line.split())[3] == "reset"
    }
    assert set(in_acl) == {WORKER, PRODUCER, SCALER}
    for user, granted in in_acl.items():
        assert in_conf[user] == granted, user


def test_each_user_is_refused_what_it_does_not_need(redis_server, producer_url, worker_url):
    producer = redis.Redis.from_url(producer_url)
    worker = redis.Redis.from_url(worker_url)
    stream = jobs_key("refusals")
    for command in (
        ("XREADGROUP", "GROUP", "workers", "thief", "STREAMS", stream, ">"),
        ("XACK", stream, "workers", "0-1"),
        ("XGROUP", "CREATE", stream, "mine", "0", "MKSTREAM"),
        ("FUNCTION", "LOAD", "REPLACE", "#!lua name=sluice\n"),
        ("FLUSHALL",),
        ("CONFIG", "GET", "*"),
        ("KEYS", "*"),
        ("GET", "someone-else:secret"),  # a command it has, on a key outside sluice:*
        ("XADD", "someone-else:stream", "*", "f", "v"),
        # Issue 16, finding 7: other producers' queued inputs, dead letters, a model's
        # registration, the lanes themselves.
        ("XRANGE", stream, "-", "+"),
        ("XREAD", "STREAMS", stream, "0"),
        ("XRANGE", dead_key("refusals"), "-", "+"),
        ("DEL", stream),
        ("XTRIM", stream, "MAXLEN", "0"),
        ("XDEL", stream, "0-1"),
        ("XGROUP", "DESTROY", stream, "workers"),
        ("DEL", "sluice:{refusals}:info"),
        ("HSET", "sluice:{refusals}:info", "task", "evil"),
        ("DEL", "sluice:{refusals}:stats"),
        ("SADD", "sluice:models", "evil"),
        ("DEL", "sluice:models"),
        ("XADD", dead_key("refusals"), "*", "f", "v"),
        ("SET", "sluice:{refusals}:info", "x"),
        ("GET", jobs_key("refusals")),
    ):
        assert refused(producer, *command), f"the producer may run {command}"
    for command in (
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "SET", "maxmemory", "1"),
        ("ACL", "SETUSER", "evil", "on", "nopass", "+@all", "~*"),
        ("KEYS", "*"),
        ("DEL", result_key("refusals", "x")),
        ("GET", "someone-else:secret"),
        ("SET", "someone-else:secret", "overwritten"),
    ):
        assert refused(worker, *command), f"the worker may run {command}"
    # What they need, they have.
    assert producer.xadd(stream, {"id": "j", "input": "{}"}) and producer.xlen(stream) == 1
    assert worker.xgroup_create(stream, "workers", id="0")
    producer.close()
    worker.close()


def test_a_job_through_a_worker_replica_and_a_producer_client(
    r, deploy, model_name, tiny_bert, producer_url
):
    r.acl_log_reset()
    deploy(model_name, tiny_bert, queue={"trim_interval_s": 0.2})
    with Client(producer_url, recheck_s=0.5) as client:
        ids = client.submit_many(model_name, ["first", "second", "third"])
        assert all(res.ok for res in client.results(ids, timeout=30))
        # A cancel that comes first wins: the id is answered `cancelled`, never run.
        early = client.cancel("cancel-me", model=model_name)
        assert early.status == "cancelled"
        client.submit(model_name, "too late", id="cancel-me")
        assert client.wait(["cancel-me"], timeout=10)[0].status == "cancelled"
        # A cancel after the result changes nothing.
        assert client.cancel(ids[0]).status == "ok"
        users = {c["user"] for c in r.client_list()}
        assert {WORKER, PRODUCER} <= users, users
    # A raw entry with no id is dead-lettered by the worker; a reply_to outside sluice:*
    # is refused to the worker, and the job is answered and acked all the same.
    r.xadd(jobs_key(model_name), {"input": '{"text": "no id"}'})
    elsewhere = f"elsewhere-{model_name}"
    r.xadd(jobs_key(model_name), {"id": "far", "input": '{"text": "x"}', "reply_to": elsewhere})
    wait_for(lambda: dead_letters(r, model_name), 30, what="the dead letter")
    wait_for(lambda: r.get(result_key(model_name, "far")), 30, what="the result of `far`")
    wait_for(lambda: group_pending(r, model_name) == 0, 10, what="every entry acked")
    assert not r.exists(elsewhere)
    # Acked entries are trimmed (XTRIM MINID keeps the last delivered one).
    wait_for(lambda: r.xlen(jobs_key(model_name)) <= 1, 10, what="the lane trimmed")
    assert r.xlen(dead_key(model_name)) == 1

    denials = [(e["username"], e["reason"], e["object"]) for e in r.acl_log()]
    assert denials == [(WORKER, "key", elsewhere)], denials


def test_a_wrong_password_fails_clearly(redis_server, model_name):
    url = redis_server.url_for(PRODUCER, "not-the-password")
    with Client(url) as client, pytest.raises(AuthenticationError, match="username-password"):
        client.submit(model_name, "x")


def test_a_producer_cannot_load_the_library_and_says_why(acl_lines):
    server = RedisServer(acl_lines=acl_lines).start()  # empty: no replica ever registered
    try:
        with Client(server.url_for(PRODUCER, PASSWORDS[PRODUCER])) as client:
            with pytest.raises(UnknownModel, match="no replica has started") as err:
                client.submit("minilm", "x")
        assert isinstance(err.value.__cause__, NoPermissionError)
    finally:
        server.cleanup()


# ---------------------------------------------------------------------------------------------
# TLS


def make_certificates(folder: Path) -> TlsFiles:
    """A CA, and a server certificate it signed for 127.0.0.1 (EC keys: fast to make)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (apt-get install openssl)")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for args in (
        [
            "req",
            "-x509",
            *key,
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=sluice test CA",
        ],
        ["req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
        [
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "san.cnf",
        ],
    ):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)
    return TlsFiles(*(str(folder / name) for name in ("server.crt", "server.key", "ca.crt")))


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, acl_lines: list[str]
) -> Iterator[RedisServer]:
    tls = make_certificates(tmp_path_factory.mktemp("tls"))
    server = RedisServer(acl_lines=acl_lines, tls=tls).start()
    yield server
    server.cleanup()


def test_jobs_run_end_to_end_over_tls(tls_server, deploy, model_name, tiny_bert):
    worker_url = tls_server.url_for(WORKER, PASSWORDS[WORKER])
    producer_url = tls_server.url_for(PRODUCER, PASSWORDS[PRODUCER])
    assert worker_url.startswith("rediss://") and "ssl_ca_certs=" in producer_url
    deploy(model_name, tiny_bert, url=worker_url)
    with Client(producer_url) as client:
        ids = client.submit_many(model_name, [f"over tls {i}" for i in range(20)])
        results = client.results(ids, timeout=30)
        assert [res.status for res in results] == ["ok"] * 20
        assert len(results[0].output) == 32
        assert client.cancel("tls-cancel", model=model_name).status == "cancelled"
    # Without the CA, the server's certificate does not verify: a clear error, no job sent.
    no_ca = producer_url.split("?", 1)[0]
    with Client(no_ca) as client:
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            client.submit(model_name, "x")
    # And there is no plain-text port to fall back to.
    plain = redis.Redis(port=tls_server.port, socket_connect_timeout=2, socket_timeout=2)
    with pytest.raises(redis.ConnectionError):
        plain.ping()
