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
    assert results["lion_ops.Lion8bit"]["lion_ops_8bit_time_ratio"] == 1.0
    # The targets this run can tell: the 8-bit step against the 32-bit one, the host overhead.
    assert {(c["target"], c["set"]) for c in report["targets"]} == {
        ("Lion8bit step time / Lion's <= 1.0", "single16m"),
        ("host overhead / the lowest peer's (torch foreach) < 1.0", "tiny")}
    overhead = report["overhead"]
    for name in ("lion_ops.Lion", "lion_ops.Lion8bit", "torch foreach"):
        assert overhead[name]["status"] == "ok" and overhead[name]["us_per_step"] > 0
        assert len(overhead[name]["us_per_step_rounds"]) == 10


def test_ncu_summary_reads_a_recorded_profile_and_section_columns(tmp_path):
    import csv

    import ncu_summary
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "bench_results", "h200", "8857d0c-ncu.csv")) as f:
        lines = ncu_summary.summarize(f.read().splitlines())
    assert len(lines) == 18 and lines[0].startswith("unnamed>::lion_32bit_kernel<float> grid")
    assert "606.2 us; dram 84%" in lines[0]
    # Columns of ncu's sections (SpeedOfLight, Occupancy, WarpStateStats), as a raw page has them.
    header = ["ID", "Kernel Name", "Grid Size", "Block Size", "launch__registers_per_thread",
              "gpu__time_duration.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
              "sm__warps_active.avg.pct_of_peak_sustained_active",
              "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
              "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio",
              "smsp__average_warps_issue_stalled_not_issued_per_issue_active.ratio"]
    rows = [header, [""] * len(header),
            ["0", "void lion_8bit_kernel<float, 0, 0>(Lion8bitBatch)", "(660, 1, 1)",
             "(256, 1, 1)", "46", "1,616,064", "58.09", "55.1", "3.25", "12.5", "99"]]
    path = tmp_path / "sections.csv"
    with open(path, "w", newline="") as f:
        f.write("==PROF== Connected\n")
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)
    assert ncu_summary.summarize(path.read_text().splitlines()) == [
        "lion_8bit_kernel<float, 0, 0> grid (660, 1, 1) block (256, 1, 1) regs 46; 1616.1 us; "
        "dram 58% occupancy 55%; stalls (cycles per issue): mio_throttle 12.50, "
        "long_scoreboard 3.25"]


def _verdicts(report, cuda):
    return {(c["target"], c["set"]): (round(c["value"], 3), c["met"])
            for c in benchmark.target_checks(report, cuda)}


def test_targets_of_a_recorded_gpu_run():
    """The verdicts on the H200 run at 6ebab5a, whose figures the README quotes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "bench_results", "h200", "6ebab5a-bench.json")) as f:
        report = json.load(f)
    assert _verdicts(report, cuda=True) == {
        ("Lion8bit step time / Lion's <= 1.0", "gpt2"): (0.924, True),
        ("Lion8bit step time / Lion's <= 1.0", "llama1b"): (0.875, True),
        ("Lion8bit step time / Lion's <= 1.0", "single16m"): (1.001, False),
        ("Lion8bit back-to-back step time / Lion's <= 1.0", "gpt2"): (0.884, True),
        ("Lion8bit back-to-back step time / Lion's <= 1.0", "llama1b"): (0.857, True),
        ("Lion8bit back-to-back step time / Lion's <= 1.0", "single16m"): (0.9, True),
        ("lion_ops.Lion: fraction of the copy bandwidth >= 0.85", "llama1b"): (0.905, True),
        ("lion_ops.Lion8bit: fraction of the copy bandwidth >= 0.85", "llama1b"): (0.726, False),
        # (back to back: the fraction scaled by the isolated over the back-to-back time)
        ("lion_ops.Lion: back-to-back fraction of the copy bandwidth >= 0.85", "llama1b"):
            (0.97, True),
        ("lion_ops.Lion8bit: back-to-back fraction of the copy bandwidth >= 0.85", "llama1b"):
            (0.795, False),
        ("lion_ops.Lion step time / every peer's < 1.0 (worst: lion_pytorch triton)",
         "llama1b"): (1.032, False),
        ("lion_ops.Lion8bit step time / every peer's < 1.0 (worst: lion_pytorch triton)",
         "llama1b"): (0.903, True),
        ("lion_ops.Lion back-to-back step time / every peer's < 1.0 (worst: torch foreach "
         "compiled)", "llama1b"): (1.034, False),
        ("lion_ops.Lion8bit back-to-back step time / every peer's < 1.0 (worst: torch foreach "
         "compiled)", "llama1b"): (0.886, True),
        ("host overhead / the lowest peer's (torch foreach) < 1.0", "tiny"): (0.802, True),
    }


def test_targets_on_the_cpu_set_and_their_thresholds():
    def result(ms):
        return dict(status="ok", median_s=float(ms))  # (whole numbers: exact ratios)

    def report(lion, lion8, compiled, bnb8):
        return dict(sets=dict(gpt2=dict(results={
            "lion_ops.Lion": result(lion), "lion_ops.Lion8bit": result(lion8),
            "torch foreach compiled": result(compiled), "bnb.Lion8bit": result(bnb8),
            "timm.Lion": dict(status="missing (not installed)")})),
            overhead={"lion_ops.Lion": dict(status="ok", us_per_step=300.0),
                      "lion_ops.Lion8bit": dict(status="ok", us_per_step=310.0),
                      "torch foreach compiled": dict(status="ok", us_per_step=310.0)})

    names = ["Lion8bit step time / Lion's <= 1.0",
             "Lion step time / compiled foreach's <= 1.0",
             "Lion8bit step time / compiled foreach's <= 0.85",
             "bitsandbytes Lion8bit step time / Lion8bit's >= 20",
             "host overhead / the lowest peer's (torch foreach compiled) < 1.0"]
    # Every target exactly at its threshold is met, except the strict overhead one.
    at = _verdicts(report(100, 85, 100, 1700), cuda=False)
    assert [at[(n, "tiny" if "overhead" in n else "gpt2")][1] for n in names] == [
        True, True, True, True, False]
    past = _verdicts(report(101, 102, 100, 2000), cuda=False)
    assert [past[(n, "tiny" if "overhead" in n else "gpt2")][1] for n in names] == [
        False, False, False, False, False]
    # The CUDA targets are not applied to the CPU set, nor the CPU ones on CUDA.
    assert len(at) == 5 and _verdicts(report(100, 85, 100, 1700), cuda=True).keys() == {
        ("Lion8bit step time / Lion's <= 1.0", "gpt2"), (names[4], "tiny")}


def test_back_to_back_bandwidth_and_its_target():
    """On a GPU each result has a back-to-back fraction of the copy bandwidth (its bytes over
    its pipelined time), with its own 85% target beside the isolated step's."""
    def result(median_s, pipelined_s):
        return dict(status="ok", median_s=median_s, pipelined_s=pipelined_s,
                    bytes_per_step=1000.0, achieved_bytes_per_s=1000.0 / median_s)

    report = dict(sets=dict(llama1b=dict(bytes_fp32_state=1000.0, results={
        "lion_ops.Lion": result(1.25, 1.0), "lion_ops.Lion8bit": result(1.5, 1.2)})))
    benchmark.derive(report, copy_bw=1000.0, inplace_bw=None)
    results = report["sets"]["llama1b"]["results"]
    assert results["lion_ops.Lion"]["fraction_of_floor"] == pytest.approx(0.8)
    assert results["lion_ops.Lion"]["fraction_of_floor_back_to_back"] == pytest.approx(1.0)
    assert results["lion_ops.Lion8bit"]["fraction_of_floor_back_to_back"] == pytest.approx(
        1 / 1.2)
    verdicts = _verdicts(report, cuda=True)
    assert verdicts[("lion_ops.Lion: fraction of the copy bandwidth >= 0.85", "llama1b")] == (
        0.8, False)
    assert verdicts[("lion_ops.Lion: back-to-back fraction of the copy bandwidth >= 0.85",
                     "llama1b")] == (1.0, True)
    assert verdicts[("lion_ops.Lion8bit: back-to-back fraction of the copy bandwidth >= 0.85",
                     "llama1b")] == (0.833, False)
    assert verdicts[("Lion8bit back-to-back step time / Lion's <= 1.0", "llama1b")] == (
        1.2, False)


def test_host_timeline_splits_a_step_into_python_and_operator_time(tmp_path, capsys):
    import host_timeline
    out = tmp_path / "timeline.json"
    assert host_timeline.main(["--device", "cpu", "--sets", "tiny", "--classes",
                               "Lion,Lion8bit,PagedLion8bit", "--warmup", "1", "--repeats", "3",
                               "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["sets"]["tiny"]) == {"Lion", "Lion8bit"}  # paged: CUDA only
    for r in report["sets"]["tiny"].values():
        parts = r["host_parts"]
        assert parts["calls of lion_update_32bit"] == 1 and parts["calls of increment_steps"] == 1
        timed = sum(v for k, v in parts.items() if not k.startswith("calls of "))
        # The parts are medians of each part, the host time the median of their sums.
        assert 0 < r["host_s"] and abs(timed - r["host_s"]) < 0.5 * r["host_s"]
        assert r["device_step_s"] is None and r["kernel_s"] is None
    assert "python before the first operator" in capsys.readouterr().out
    # After the run the operators are lion_ops' own again.
    from lion_ops import ops
    assert ops.lion_update_32bit.__name__ == "lion_update_32bit"


def test_host_timeline_split_of_recorded_stamps():
    import host_timeline
    parts = host_timeline.split_host_time(0.0, 10.0, [("a", 1.0, 3.0), ("b", 4.0, 8.0),
                                                       ("a", 8.5, 9.0)])
    assert parts == {"python before the first operator": 1.0, "op a": 2.5, "calls of a": 2,
                     "op b": 4.0, "calls of b": 1, "python between operators": 1.5,
                     "python after the last operator": 1.0}
    assert list(parts)[-2:] == ["python between operators", "python after the last operator"]
