"""Classification through the real queue and a real Serve app: labels and scores as the model
itself gives them, top_k, and clear errors for bad params."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sluice.client import Client
from tests.conftest import SENTIMENT

pytestmark = pytest.mark.integration

TEXTS = [
    "I loved it, best purchase this year.",
    "The parcel arrived broken and late.",
    "It is a chair.",
    "short",
    "word " * 300,  # over the 128-token limit: truncated, as the pipeline does
]


def expected_scores(path: str, texts: list[str]) -> torch.Tensor:
    """The model's own softmax, one text at a time, no queue."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    rows = []
    with torch.inference_mode():
        for text in texts:
            batch = tokenizer([text], truncation=True, max_length=128, return_tensors="pt")
            rows.append(model(**batch).logits.softmax(-1)[0])
    return torch.stack(rows)


def test_classify_jobs_get_the_models_labels_and_scores(
    deploy, model_name, tiny_classifier, producer_url
):
    deploy(model_name, tiny_classifier, task="classify", max_batch_size=8)
    want = expected_scores(tiny_classifier, TEXTS)
    assert len({int(i) for i in want.argmax(-1)}) > 1, "the test needs texts of different labels"

    with Client(producer_url) as client:
        ids = client.submit_many(model_name, [{"text": t} for t in TEXTS])
        top3 = client.submit(model_name, {"text": TEXTS[0]}, params={"top_k": 3})
        results = client.wait([*ids, top3], timeout=60)

    for res, scores in zip(results[:-1], want, strict=True):
        assert res.status == "ok", res.error
        best = int(scores.argmax())
        assert res.output["label"] == SENTIMENT[best]
        assert res.output["score"] == pytest.approx(float(scores[best]), abs=1e-4)
        assert res.output["labels"] == [
            {"label": res.output["label"], "score": res.output["score"]}
        ]
    ranked = results[-1].output["labels"]
    assert [r["label"] for r in ranked] == [
        SENTIMENT[int(i)] for i in want[0].argsort(descending=True)
    ]
    assert sum(r["score"] for r in ranked) == pytest.approx(1.0, abs=1e-4)
    assert ranked[0]["score"] >= ranked[1]["score"] >= ranked[2]["score"]


@pytest.mark.parametrize("top_k", [0, 4, "2", True])
def test_classify_refuses_a_bad_top_k_clearly(
    deploy, model_name, tiny_classifier, producer_url, top_k
):
    deploy(model_name, tiny_classifier, task="classify")
    with Client(producer_url) as client:
        job = client.submit(model_name, {"text": "fine"}, params={"top_k": top_k})
        (res,) = client.wait([job], timeout=60)
    assert res.status == "error"
    assert res.error["code"] == "invalid_params"
    assert "top_k must be an integer from 1 to 3" in res.error["message"]
