"""The generation benchmark end to end on the tiny shape: both paths run, every token counted."""

from __future__ import annotations

import json

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
