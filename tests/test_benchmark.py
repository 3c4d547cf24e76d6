"""tools/benchmark.py runs end to end on the CPU and reports what its README tables need, in
both timing modes (interleaved rounds and back-to-back runs)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import benchmark  # noqa: E402


@pytest.mark.parametrize("interleave", ["on", "off"])
def test_benchmark_reports_every_implementation(tmp_path, interleave):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--device", "cpu", "--quick", "--sets", "single16m", "--peers",
                           "foreach,timm", "--overhead-steps", "20", "--interleave", interleave,
                           "--copy-mb", "256", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    entry = report["sets"]["single16m"]
    assert entry["interleaved"] is (interleave == "on")
    results = entry["results"]
    for name in ("lion_ops.Lion", "lion_ops.Lion8bit", "torch foreach"):
        r = results[name]
        assert r["status"] == "ok", (name, r)
        assert len(r["times_s"]) == 2 and r["median_s"] > 0
        assert r["lion_ops_time_ratio"] > 0 and r["fraction_of_floor"] > 0
    # Every implementation starts from the same params and grads: after one step they agree.
    assert results["torch foreach"]["max_abs_diff_step1"] < 1e-6
    assert results["lion_ops.Lion8bit"]["max_abs_diff_step1"] < 1e-6
    assert results["lion_ops.Lion"]["state_bytes_per_param"] == pytest.approx(4.0)
    assert results["lion_ops.Lion8bit"]["state_bytes_per_param"] == pytest.approx(1.02, abs=0.01)
    # A peer that is not installed is reported, not dropped; CUDA-only ones say so.
    assert results["lion_ops.PagedLion"]["status"] == "skipped: CUDA only"
    if "timm" not in sys.modules:
        assert results["timm.Lion"]["status"].startswith(("missing", "ok"))
    overhead = report["overhead"]
    for name in ("lion_ops.Lion", "lion_ops.Lion8bit", "torch foreach"):
        assert overhead[name]["status"] == "ok" and overhead[name]["us_per_step"] > 0
        assert len(overhead[name]["us_per_step_rounds"]) == 10
