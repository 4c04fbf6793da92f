"""The benchmark harness end to end on the tiny model (a smoke run: no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from benchmarks.flops import mfu, peak_tflops
from benchmarks.pipeline import Shape, psnr, relative_error
from benchmarks.report import markdown


def test_harness_smoke_runs_pipeline_and_server_levels_and_writes_reports(tiny_checkpoint, tmp_path):
    from benchmarks.run import main

    out = tmp_path / "bench"
    results = main(
        ["--weights", tiny_checkpoint, "--device", "cpu", "--modes", "none,step-cache,fp8",
         "--shapes", "512x512x1,512x512x2", "--steps", "3", "--warmup", "1", "--runs", "1",
         "--cache-threshold", "0.5", "--out", str(out)]
    )  # fmt: skip
    assert json.loads((out / "results.json").read_text())["meta"]["weights"] == tiny_checkpoint
    assert "| step-cache | 512x512 b2 |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    none, cache, fp8 = results["modes"]
    assert [row["shape"] for row in none["shapes"]] == ["512x512 b1", "512x512 b2"]
    assert all(row["speedup"] == 1.0 for row in none["shapes"])
    assert none["time_to_ready_s"] > none["build_s"] and none["warmup_compiles"] == 0  # eager: no graphs
    assert "| none |" in (out / "results.md").read_text().split("## Time to ready")[1]
    for row in cache["shapes"]:
        assert row["speedup"] > 0 and row["tflop_per_step"] > 0
        assert 1 <= row["steps_computed"] <= 3
        assert row["mfu"] is None  # no GPU peak to divide by
    assert cache["quality"]["shape"] == "512x512 b1" and cache["quality"]["psnr_db"] > 0
    assert cache["memory"]["peak_gpu_gb"] is None
    server = none["server"]
    assert server["server_median_s"] > 0 and server["overhead"] > -1
    assert server["concurrent_requests"] == 2 and server["png_encode_ms"] > 0
    assert "compute capability" in fp8["error"]  # a mode that cannot run here is reported, not fatal


def test_time_budget_keeps_each_modes_first_shape_and_skips_the_rest(tiny_checkpoint, tmp_path):
    from benchmarks.run import main

    results = main(
        ["--weights", tiny_checkpoint, "--device", "cpu", "--modes", "none", "--no-server", "--steps", "1",
         "--shapes", "512x512x1,512x512x2", "--runs", "1", "--budget-s", "0.001", "--out", str(tmp_path)]
    )  # fmt: skip
    (mode,) = results["modes"]
    assert [row["shape"] for row in mode["shapes"]] == ["512x512 b1"]
    assert mode["skipped_shapes"] == ["512x512 b2"]


def test_shapes_parse_with_default_batch():
    assert Shape.parse("1344x768") == Shape(1344, 768, 1)
    assert Shape.parse("1024x1024x4").label == "1024x1024 b4"
    with pytest.raises(ValueError):
        Shape.parse("1024")


def test_quality_metrics():
    import numpy as np
    import torch

    image = np.full((1, 4, 4, 3), 100, dtype=np.uint8)
    assert psnr(image, image) == float("inf")
    assert psnr(image + 1, image) == pytest.approx(48.13, abs=0.01)
    reference = torch.ones(8)
    assert relative_error(reference * 1.1, reference) == pytest.approx(0.1)


def test_mfu_uses_the_gpus_bf16_peak():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert peak_tflops("Some Future GPU") is None
    assert mfu(989.4e12, 2.0, 989.4) == pytest.approx(0.5)
    assert mfu(1.0, 1.0, None) is None


def test_markdown_reports_a_failed_mode():
    results = dict(
        meta=dict(weights="tiny", device_name="CPU", command="x", steps=2, warmup=1, runs=1, peak_tflops=None,
                  torch="t", diffusers="d"),
        modes=[dict(mode="fp8", error="OptimizationError: needs a GPU", quality_cost="lossy")],
    )  # fmt: skip
    assert "| fp8 | – | failed: OptimizationError: needs a GPU" in markdown(results)


def test_warmup_harness_reports_compiles_time_to_ready_and_first_vs_second(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """Smoke run with dynamo's eager backend (inductor's own runs are in tests/test_inductor.py)."""
    import octoflux.pipelines.optimize as optimize
    from benchmarks.warmup import main

    real = optimize.compile_transformer
    monkeypatch.setattr(optimize, "compile_transformer", lambda t, **kw: real(t, backend="eager", **kw))
    # The harness points TORCHINDUCTOR_CACHE_DIR at a cold folder it then deletes: undone after the test.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    results = main(
        ["--weights", tiny_checkpoint, "--device", "cpu", "--options", "static-lazy,dynamic",
         "--sizes", "256x256,320x192", "--max-batch", "2", "--steps", "1", "--step-runs", "1",
         "--step-sizes", "256x256", "--step-steps", "1", "--out", str(tmp_path)]
    )  # fmt: skip
    static, dynamic = results["options"]
    assert static["warmup_compiles"] >= 2 and static["time_to_ready_s"] > 0
    assert [p["size"] for p in static["probes"]] == ["256x256", "320x192", "320x192"]
    assert static["probes"][1]["first_compiles"] > 0  # an unwarmed size recompiles static graphs
    assert dynamic["probes"][1]["first_compiles"] == 0  # one dynamic graph serves both sizes
    assert all(p["second_compiles"] == 0 for o in results["options"] for p in o["probes"])
    assert "| dynamic |" in (tmp_path / "warmup.md").read_text()


def test_overhead_harness_reports_server_minus_engine_per_encoding(tiny_checkpoint, tmp_path):
    from benchmarks.overhead import main

    results = main(
        ["--weights", tiny_checkpoint, "--device", "cpu", "--sizes", "512x512", "--runs", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert [(r["size"], r["encoding"]) for r in results["rows"]] == [("512x512", "png"), ("512x512", "jpeg")]
    for row in results["rows"]:
        assert row["engine_ms"] > 0 and row["request_ms"] > row["engine_ms"] and row["overhead_ms"] > 0
        assert {"pillow-png", "jpeg"} <= set(row["encoders_ms"])
    assert "| 512x512 | jpeg |" in (tmp_path / "overhead.md").read_text()
