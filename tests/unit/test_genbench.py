"""The generation benchmark end to end on the tiny shape: both paths run, every token counted."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.genbench import SHAPES, main, parse, word_tokenizer, workload


def test_genbench_tiny_reports_both_paths_and_passes_the_spot_check(tmp_path, capsys):
    out = tmp_path / "gb.json"
    args = ["--shape", "tiny", "--requests", "8", "--repeats", "1", "--no-progress"]
    args += ["--output-len", "2..12", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    tok = word_tokenizer(SHAPES["tiny"]["vocab_size"])
    asked = [r.new_tokens for r in workload(parse(args), tok, 8, seed=0)]
    for path in ("static", "continuous"):
        run = report["runs"][0][path]
        assert run["tokens_per_s"] > 0 and run["requests_per_s"] > 0
        assert run["useful_tokens"] == sum(asked)
        assert run["per_request"]["output_len"] == asked
    assert report["spot_check"]["checked"] and report["spot_check"]["passed"]
    assert "ratio continuous ÷ static" in capsys.readouterr().out


def test_chatbench_figures_count_tokens_slo_and_ratios() -> None:
    from argparse import Namespace

    from loadtest.chatbench import figures, summary
    from loadtest.chatsystems import Record, Req

    ns = Namespace(slo_ttft_ms=1000.0, slo_tpot_ms=100.0)
    reqs = [Req(f"q{i}", [], [1], 11, 0.0) for i in range(4)]
    # Sent at 0; first text at 0.5 s (two of them at 2 s: over the TTFT SLO); 10 more
    # tokens 50 ms apart, or 200 ms apart for the last one (over the TPOT SLO).
    records = [
        Record(0.0, 0.5, 1.0, 11),
        Record(0.0, 0.5, 1.0, 11),
        Record(0.0, 2.0, 2.5, 11),
        Record(0.0, 0.5, 2.5, 11),
    ]
    out = figures(reqs, records, ns)
    assert out["tokens"] == 44 and out["wall_s"] == 2.5
    assert out["tokens_per_s"] == 44 / 2.5 and out["requests_short"] == 0
    assert out["slo_met_share"] == 0.5 and out["goodput_requests_per_s"] == 2 / 2.5
    assert out["ttft_p50_ms"] == 500.0
    twice = {**out, "tokens_per_s": 2 * out["tokens_per_s"]}
    rows = dict(summary([{"sluice": twice, "static": out}], ["sluice", "static"]))
    assert rows["**Sluice ÷ static, tokens/s**"] == [2.0]


def test_weightsplot_groups_reports_by_concurrency_and_scheme(tmp_path):
    from loadtest import weightsplot

    def report(concurrency: int, scheme: str, sluice: float) -> Path:
        path = tmp_path / f"c{concurrency}-{scheme}.json"
        summary = {
            "**Sluice ÷ llama.cpp, tokens/s**": {"median": 0.5, "runs": [0.5]},
            "sluice: output tokens/s": {"median": sluice, "runs": [sluice]},
            "llama.cpp: output tokens/s": {"median": 80.0, "runs": [80.0]},
            "sluice: TTFT p50 (ms)": {"median": 50.0, "runs": [50.0]},
        }
        settings = {"concurrency": concurrency, "quantization": scheme}
        path.write_text(json.dumps({"summary": summary, "settings": settings}))
        return path

    paths = [report(1, "none", 26.0), report(1, "int4-weight", 46.0), report(8, "none", 115.0)]
    table = weightsplot.load(paths)
    assert table[1]["int4-weight"] == {"sluice": 46.0, "llama.cpp": 80.0}
    assert set(table) == {1, 8}
    out = tmp_path / "w.png"
    assert weightsplot.main([*map(str, paths), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
