"""scripts/gpu_checks.py, the prepared GPU run, through its --dry-run (the same code at tiny shapes
on the CPU): every section reports numbers, one JSON and one Markdown file are written, a failing
or overrunning section is recorded while the others run, and without CUDA the real run refuses."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import tolerance
import torch


@pytest.fixture(scope="module")
def gpu_checks():
    path = Path(__file__).parents[1] / "scripts" / "gpu_checks.py"
    spec = importlib.util.spec_from_file_location("gpu_checks_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_dry_run_reports_every_section(gpu_checks, tmp_path):
    out = tmp_path / "checks"
    assert gpu_checks.main(["--dry-run", "--out", str(out)]) == 0
    record = json.loads((out / "gpu_checks.json").read_text())
    assert record["dry_run"] and record["command"] == f"python scripts/gpu_checks.py --dry-run --out {out}"
    assert record["environment"]["versions"]["torch"] == torch.__version__
    assert list(record["sections"]) == list(gpu_checks.SECTIONS)
    for name, entry in record["sections"].items():
        assert entry["status"] == "ok", (name, entry.get("traceback"))
        assert "error" not in entry and entry["rows"] and entry["headline"]
        assert 0 < entry["seconds"] <= record["seconds"] and entry["budget_s"] == gpu_checks.DRY.budgets[name]
    sections = record["sections"]

    kernels = sections["kernels"]["rows"]  # no Triton path on the CPU
    assert [(row["shape"], row["path"]) for row in kernels] == [
        (shape, path) for shape in ("2x33x16", "2x17x8") for path in ("tome", "reference")]
    assert all(row["ms"] > 0 and row["gb_per_s"] > 0 and row["fraction_of_peak"] is None for row in kernels)
    assert [row["r"] for row in kernels] == [4, 4, 2, 2]
    assert all(row["speedup_vs_reference"] == 1.0 for row in kernels if row["path"] == "reference")

    vit = {row["reducer"]: row for row in sections["vit"]["rows"]}
    assert list(vit) == ["unreduced", "tome r=13", "dymu padded", "dymu packed"]
    assert vit["unreduced"]["patch_tokens_out"] == 16 and vit["unreduced"]["speedup"] == 1.0  # 64 px / 16 px patches
    assert vit["tome r=13"]["patch_tokens_out"] == sections["vit"]["dymu_target"] < 16
    for label in ("dymu padded", "dymu packed"):
        assert vit[label]["patch_tokens_out"] < 16 and vit[label]["flops_reduction"] > 1
        assert vit[label]["efficiency"] == vit[label]["speedup"] / vit[label]["flops_reduction"]
    assert vit["dymu packed"]["patch_tokens_out"] == vit["dymu padded"]["patch_tokens_out"]
    best = [row for row in kernels if row["path"] == "reference"]  # the fastest path on the CPU: its parts are timed
    assert all(row["merge_ms"] > 0 and 0 < row["slot_order_share_of_step"] for row in best)
    assert all(row["merge_ms"] is None for row in kernels if row["path"] != "reference")
    assert all(row["img_per_s"] > 0 and row["mean_tokens_per_layer"] > 0 for row in vit.values())

    prefill = sections["llava_prefill"]["rows"]
    assert [row["visual_tokens"] for row in prefill] == [row["seen"] for row in prefill] == [576, 192, 64]
    assert [row["prompt_tokens"] for row in prefill] == [611, 227, 99]  # 35 text tokens around the image
    assert all(row["prefill_flops_measured_over_predicted"] == pytest.approx(1.0, abs=1e-3) for row in prefill)
    flops, kv = [row["prefill_gflops"] for row in prefill], [row["kv_cache_mib"] for row in prefill]
    assert flops == sorted(flops, reverse=True) and kv == sorted(kv, reverse=True)
    assert prefill[0]["vision_prefill_speedup"] == 1.0 and prefill[2]["prefill_flops_reduction"] > 5

    varlen = sections["varlen"]["rows"]  # no FlexAttention in the dry run (it compiles)
    assert [row["backend"] for row in varlen] == ["padded", "split", "nested"]
    assert all(row["tokens"] == varlen[0]["tokens"] and row["widest"] == 9 and row["ms"] > 0 for row in varlen)
    # bfloat16 (the script's dtype): 64-term logits, softmax over at most 9 keys, outputs bounded by |v|
    # (standard normal: below 5); float32 agreement is tests/test_packing.py's
    bound = tolerance.tolerance(gpu_checks.DTYPE, terms=64 + 9, scale=5.0)
    assert all(row["max_abs_diff_to_padded"] <= bound for row in varlen)

    e2e = sections["llava_e2e"]["rows"]
    assert [(row["batch"], row["visual_tokens"]) for row in e2e] == [(b, k) for b in (1, 2) for k in (576, 64, 144, 192)]
    assert all(row["new_tokens"] == 4 and row["total_tok_s"] > 0 for row in e2e)

    text = (out / "gpu_checks.md").read_text()
    assert "DRY RUN" in text
    for name in gpu_checks.SECTIONS:
        assert f"| {name} | ok |" in text and f"## {name}" in text


def test_a_failing_section_is_recorded_and_the_others_run(gpu_checks, tmp_path, monkeypatch):
    def broken(plan, device, shared):
        raise RuntimeError("simulated failure")

    monkeypatch.setitem(gpu_checks.CHECKS, "vit", broken)
    out = tmp_path / "checks"
    assert gpu_checks.main(["--dry-run", "--sections", "vit", "kernels", "--out", str(out)]) == 1
    sections = json.loads((out / "gpu_checks.json").read_text())["sections"]
    assert list(sections) == ["kernels", "vit"]  # in the script's order
    assert sections["kernels"]["status"] == "ok" and sections["kernels"]["rows"]
    assert sections["vit"]["status"] == "error" and sections["vit"]["error"] == "RuntimeError: simulated failure"
    assert "simulated failure" in sections["vit"]["traceback"]
    assert "| vit | error |" in (out / "gpu_checks.md").read_text()


def test_a_section_past_its_budget_is_stopped(gpu_checks, monkeypatch):
    def slow(plan, device, shared):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return {"rows": [], "headline": "never"}

    monkeypatch.setitem(gpu_checks.CHECKS, "kernels", slow)
    plan = dataclasses.replace(gpu_checks.DRY, budgets={**gpu_checks.DRY.budgets, "kernels": 0.3})
    entry = gpu_checks.run_section("kernels", plan, torch.device("cpu"), {})
    assert entry["status"] == "error" and entry["error"] == "SectionTimeout: ran past its budget of 0.3 s"
    assert entry["seconds"] < 20


def test_refuses_without_cuda_unless_dry_run(gpu_checks, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "checks"
    with pytest.raises(SystemExit) as exit_info:
        gpu_checks.main(["--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "no CUDA GPU is available" in error and "--dry-run" in error
    with pytest.raises(SystemExit):
        gpu_checks.main(["--device", "cpu", "--out", str(out)])
    assert "measures on a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
