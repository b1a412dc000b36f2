"""scripts/bench_llava.py --e2e: whole generate() calls of the LLaVA-1.5-7B-shaped model (here its
tiny shape) at several batch sizes, the unreduced model and pool at several token counts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench_llava():
    path = Path(__file__).parents[1] / "scripts" / "bench_llava.py"
    spec = importlib.util.spec_from_file_location("bench_llava_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_e2e_rows_counts_and_ratios(bench_llava, tmp_path):
    out = tmp_path / "e2e"
    argv = ["--e2e", "--shape", "tiny", "--batches", "1", "2", "--new-tokens", "4", "--repeats", "1", "--warmup", "0",
            "--out", str(out)]
    assert bench_llava.main(argv) == 0
    record = json.loads((out / "bench_llava_e2e.json").read_text())
    assert record["command"] == "python scripts/bench_llava.py " + " ".join(argv)
    rows = record["rows"]
    assert [(row["batch"], row["reducer"], row["visual_tokens"]) for row in rows] == [
        (batch, name, count) for batch in (1, 2) for name, count in (("none", 576), ("pool", 64), ("pool", 144), ("pool", 192))]
    dims = bench_llava.SHAPES["tiny"]
    for row in rows:
        assert row["new_tokens"] == 4 and row["repeats"] == 1 and row["seen"] == row["visual_tokens"]
        assert row["first_token_ms"] > 0 and row["total_ms"] > row["first_token_ms"]
        assert row["decode_tok_s"] == pytest.approx(row["batch"] * row["decode_tok_s_per_seq"])
        assert row["total_tok_s"] == pytest.approx(row["batch"] * 4 / (row["total_ms"] / 1e3))
        assert row["peak_memory_mib"] is None  # not measured on the CPU
        # keys and values of every decoder layer, bf16: prompt (35 text + visual tokens) + 3 decoded positions
        positions = 35 + row["visual_tokens"] + 4 - 1
        assert row["kv_cache_mib"] * 2**20 == dims["decoder_layers"] * 2 * row["batch"] * positions * dims["decoder_width"] * 2
    for batch in (1, 2):
        base, *reduced = [row for row in rows if row["batch"] == batch]
        assert all(base[f"{key}_speedup"] == 1.0 and base[f"{key}_speedup_iqr"] == [1.0, 1.0]
                   for key in ("first_token", "decode", "total"))
        assert base["kv_cache_ratio"] == 1.0
        kv = [row["kv_cache_mib"] for row in sorted(reduced, key=lambda row: row["visual_tokens"])] + [base["kv_cache_mib"]]
        assert kv == sorted(kv) and len(set(kv)) == 4  # fewer visual tokens, smaller cache
        assert all(row["kv_cache_ratio"] == row["kv_cache_mib"] / base["kv_cache_mib"] for row in reduced)
    text = (out / "bench_llava_e2e.md").read_text()
    assert text.startswith("LLaVA-1.5-7B-shaped (tiny), bfloat16, CPU (")
    assert "exactly 4 new tokens, batches 1 2" in text and "not measured on the CPU" in text
    assert "peak_memory_mib |" not in text  # no column of dashes


def test_e2e_needs_a_decode_step(bench_llava, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_llava.main(["--e2e", "--shape", "tiny", "--new-tokens", "1", "--out", str(tmp_path / "e2e")])
    assert "--e2e needs --new-tokens >= 2" in capsys.readouterr().err
