#!/usr/bin/env bash
# The one script run on a lent GPU machine (H100/H200; no network), from the repository root:
#   bash tools/gpu_check.sh            # everything lands in $OUT (default ./gpu_results)
# Stages: versions; wheels from ./.whl if present; build and install lion_ops with
# LION_OPS_CUDA=ON; a CUDA smoke test of the installed package; the CUDA tests; the
# benchmark (--quick); the host timeline of a step (tools/host_timeline.py,
# $OUT/host-timeline.json); kernel shapes (tools/kernel_shapes.py, $OUT/kernel-shapes.json);
# Nsight Compute; the CPU benchmark on this machine's cores; the rest of
# the test suite (in that order, so that what only a GPU can tell comes first). Every stage
# runs even when an earlier one failed; the script exits non-zero if any failed. All output is
# also in $OUT/gpu_check.log; the build's in $OUT/build.log; test results in
# $OUT/junit-*.xml; the benchmarks in $OUT/bench.{json,png} and $OUT/bench-cpu.json; Nsight
# Compute's kernel metrics (when ncu is installed) in $OUT/ncu.csv, and its sections (unit
# throughput, occupancy, warp stalls) of the update kernels in $OUT/ncu-sections.csv. At the
# end the JUnit reports, build log and ncu sections are packed into $OUT/extras.tar.gz.
# The whole run is kept within GPU_CHECK_BUDGET seconds (default 540, 9 minutes): each
# stage's time limit is cut so that the later stages keep some time (the benchmark about 240 s).
set -uo pipefail  # no -e: a failing stage is recorded and the next one runs

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/gpu_results}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)  # absolute: stages run in other directories
# Results of an earlier run in the same folder must not pass for this run's.
rm -f "$OUT"/junit-*.xml "$OUT"/bench.json "$OUT"/bench.png "$OUT"/build.log "$OUT"/ncu.csv \
  "$OUT"/ncu-sections.csv "$OUT"/bench-cpu.json "$OUT"/kernel-shapes.json \
  "$OUT"/host-timeline.json "$OUT"/extras.tar.gz
LOG=$OUT/gpu_check.log
BUDGET=${GPU_CHECK_BUDGET:-540}
PY=${PYTHON:-$(command -v python || command -v python3)}

# nvcc is often installed but not on PATH; CMake looks for it on PATH or in CUDACXX.
if ! command -v nvcc >/dev/null 2>&1; then
  for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    if [ -x "$dir/nvcc" ]; then
      export PATH="$dir:$PATH" CUDACXX="$dir/nvcc"
      break
    fi
  done
fi

STAGES=()   # "name|status|seconds" in order
FAILED=0

record() {  # record NAME STATUS SECONDS
  STAGES+=("$1|$2|$3")
  case "$2" in ok*|skipped*) ;; *) FAILED=1 ;; esac
}

# run_stage NAME LIMIT RESERVE DIR LOGFILE|- COMMAND...
# Runs COMMAND in DIR under `timeout`, for at most LIMIT seconds and never past the point where
# less than RESERVE seconds of the budget would be left for the stages after it.
run_stage() {
  local name=$1 limit=$2 reserve=$3 dir=$4 logfile=$5
  shift 5
  local left=$((BUDGET - SECONDS - reserve))
  if ((limit > left)); then limit=$left; fi
  echo
  local shown="$*"
  [ "${shown%%$'\n'*}" = "$shown" ] || shown="${shown%%$'\n'*} ..."
  echo "=================== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $shown"
  if ((limit < 10)); then
    echo "[$name] not run: the time budget ($BUDGET s) is spent"
    record "$name" "FAILED (no time left)" 0
    return 1
  fi
  local t0=$SECONDS rc=0
  if [ "$logfile" = "-" ]; then
    (cd "$dir" && exec timeout -k 15 "$limit" "$@") || rc=$?
  else
    (cd "$dir" && exec timeout -k 15 "$limit" "$@") >"$logfile" 2>&1 || rc=$?
  fi
  local took=$((SECONDS - t0)) status
  if ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 137)); then
    status="FAILED (timed out after ${limit}s)"
  else
    status="FAILED (exit $rc)"
  fi
  echo "[$name] $status in ${took}s"
  record "$name" "$status" "$took"
  return "$rc"
}

# junit_counts FILE: prints "passed failed errors skipped" (or nothing if FILE is unreadable).
junit_counts() {
  "$PY" - "$1" <<'EOF' 2>/dev/null
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
t = f = e = s = 0
for suite in suites:
    t += int(suite.get("tests", 0)); f += int(suite.get("failures", 0))
    e += int(suite.get("errors", 0)); s += int(suite.get("skipped", 0))
print(t - f - e - s, f, e, s)
EOF
}

# The GPU machines set CXX=/opt/gcc/bin/g++, a GCC that links libstdc++ statically; a lion_ops
# built with it segfaults on its first error message (CMakeLists.txt refuses to link it). Probe
# the compiler that CMake would use, and fall back to the system one if it does that.
links_shared_libstdcxx() {  # links_shared_libstdcxx CXX
  local dir
  dir=$(mktemp -d) || return 1
  printf '#include <sstream>\nstd::string f(long x) { std::ostringstream s; s << x; return s.str(); }\n' \
    >"$dir/probe.cpp"
  "$1" -shared -fPIC -o "$dir/probe.so" "$dir/probe.cpp" >/dev/null 2>&1 &&
    readelf -d "$dir/probe.so" 2>/dev/null | grep -q 'libstdc++\.so'
  local rc=$?
  rm -rf "$dir"
  return $rc
}

pick_compiler() {
  local cxx=${CXX:-$(command -v c++ || command -v g++)}
  if [ -z "$cxx" ] || links_shared_libstdcxx "$cxx"; then
    echo "C++ compiler: ${cxx:-none found} (links the shared libstdc++)"
    return
  fi
  echo "C++ compiler: $cxx links libstdc++ statically, which breaks lion_ops next to torch"
  if [ -x /usr/bin/g++ ] && links_shared_libstdcxx /usr/bin/g++; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
    echo "C++ compiler: using /usr/bin/g++ ($("$CXX" -dumpfullversion)) instead"
  else
    echo "C++ compiler: no alternative found; the build is expected to fail"
  fi
}

versions() {
  echo "=================== [versions] $(date -u '+%Y-%m-%d %H:%M:%S') UTC, repo $ROOT, OUT $OUT"
  git -C "$ROOT" log -1 --format='commit %h %s' 2>/dev/null || echo "commit: not a git checkout"
  timeout 30 nvidia-smi || echo "nvidia-smi failed"
  timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory \
    --format=csv 2>/dev/null || true
  echo "python: $PY ($("$PY" --version 2>&1))"
  timeout 120 "$PY" -c "import torch; c = torch.cuda.is_available(); \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', c, \
torch.cuda.get_device_name(0) if c else '')" || echo "torch: import failed"
  nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc: not found"
  cmake --version 2>/dev/null | head -n 1 || echo "cmake: not found"
  echo "ninja $(ninja --version 2>/dev/null || echo 'not found')"
  echo "CPU cores: $(nproc)"
  local wanted='torch|triton|bitsandbytes|lion.pytorch|timm|matplotlib|numpy|pytest|expecttest'
  wanted+='|scikit.build.core|cmake|ninja'
  "$PY" -m pip list 2>/dev/null | grep -i -E "^($wanted) " || true
}

# The smoke test: the installed lion_ops, with CUDA kernels, matches an fp64 Lion step on the GPU.
SMOKE=$(cat <<'EOF'
import torch, lion_ops
from lion_ops import _native
print("lion_ops", lion_ops.__version__, "from", lion_ops.__file__)
assert torch.cuda.is_available(), "torch sees no CUDA device"
assert _native.cuda_kernels_built(), "lion_ops was built without CUDA kernels"
torch.manual_seed(0)
lr, b1, b2, wd = 1e-3, 0.9, 0.99, 0.1
for dtype, rel in ((torch.float32, 1e-6), (torch.bfloat16, 2.0 ** -8)):
    p = torch.randn(100_003, device="cuda").to(dtype)
    g = torch.randn_like(p)
    m = torch.randn(p.shape, device="cuda")
    p64, g64, m64 = p.double(), g.double(), m.double()
    c = b1 * m64 + (1 - b1) * g64
    want_p = p64 * (1 - lr * wd) - lr * torch.sign(c)
    want_m = b2 * m64 + (1 - b2) * g64
    # lr and beta2 read by the kernel on the device, beta1 and wd on the host.
    torch.ops.lion.lion_update_32bit([p], [g], [m], torch.tensor(lr, device="cuda"),
                                     torch.tensor(b1), torch.tensor(b2, device="cuda"),
                                     torch.tensor(wd))
    torch.cuda.synchronize()
    clear = c.abs() > 1e-5  # where fp32 rounding cannot flip the sign of c
    bad_p = ((p.double() - want_p).abs() > rel * want_p.abs() + 1e-7) & clear
    bad_m = (m.double() - want_m).abs() > 1e-6 * want_m.abs() + 1e-7
    print(f"{dtype}: {int(bad_p.sum())} params and {int(bad_m.sum())} momenta off the fp64 "
          f"reference, of {p.numel()}")
    assert not bad_p.any() and not bad_m.any(), "the CUDA kernel disagrees with the fp64 reference"
# Paged state: managed memory, outside the caching allocator, values kept through a page-out.
support = lion_ops.ops.paging_support("cuda")
print("paging support:", {0: "none", 1: "managed memory without prefetch", 2: "with prefetch"}[support])
before = torch.cuda.memory_allocated()
paged = lion_ops.ops.zeros_paged_like(torch.empty(1 << 20, device="cuda"))
assert torch.cuda.memory_allocated() == before, "paged memory went through the caching allocator"
paged.normal_()
expected = paged.cpu()
lion_ops.ops.prefetch_paged([paged], to_host=True)
lion_ops.ops.prefetch_paged([paged])
paged.mul_(2)
assert torch.equal(paged.cpu(), expected * 2), "paged values changed through a page-out"
del paged
print("smoke test passed")
EOF
)

summary() {
  echo
  echo "=================== summary $(date -u +%H:%M:%S), ${SECONDS}s in all"
  printf '%-14s %-36s %8s\n' stage status seconds
  local entry name status took
  for entry in "${STAGES[@]}"; do
    IFS='|' read -r name status took <<<"$entry"
    printf '%-14s %-36s %8s\n' "$name" "$status" "$took"
  done
  echo
  printf '%-14s %7s %7s %7s %7s\n' tests passed failed errors skipped
  local kind counts
  for kind in cuda rest; do
    counts=$(junit_counts "$OUT/junit-$kind.xml")
    if [ -n "$counts" ]; then
      # shellcheck disable=SC2086  # word splitting of the four counts is intended
      printf '%-14s %7s %7s %7s %7s\n' "$kind" $counts
    else
      printf '%-14s %s\n' "$kind" "no results"
    fi
  done
  echo
  if [ -f "$OUT/bench.json" ]; then
    timeout 60 "$PY" - "$OUT/bench.json" <<'EOF' || echo "benchmark: could not read bench.json"
import json, sys
r = json.load(open(sys.argv[1]))
env = r["environment"]
bw = r["copy_bandwidth"].get("floor_bytes_per_s") or r["copy_bandwidth"]["before"]["bytes_per_s"]
print(f"benchmark on {env['device_name']}, torch {env['torch']}, {r['args']['dtype']}, "
      f"copy bandwidth {bw / 1e9:.0f} GB/s"
      + ("" if r.get("complete") else " (PARTIAL: the benchmark did not finish)"))
print(f"{'set':<10}{'implementation':<24}{'step ms':>9}{'%floor':>8}{'ours/it':>8}  status")
for name, entry in r["sets"].items():
    if entry.get("skipped"):
        print(f"{name:<10}skipped: {entry['skipped']}")
        continue
    for impl, x in entry["results"].items():
        if x.get("status") == "ok":
            ratio = x.get("lion_ops_time_ratio")
            print(f"{name:<10}{impl:<24}{x['median_s'] * 1e3:>9.3f}"
                  f"{100 * x['fraction_of_floor']:>7.0f}%"
                  f"{'-' if ratio is None else format(ratio, '.2f'):>8}  ok")
        else:
            print(f"{name:<10}{impl:<24}{'':>25}  {x.get('status')}")
over = r.get("overhead") or {}
if over:
    print("host overhead (us/step, 148 tiny tensors): " + ", ".join(
        f"{k} {v['us_per_step']:.0f}" if v.get("status") == "ok" else f"{k} -"
        for k, v in over.items()))
for c in r.get("targets") or []:
    print(f"target {'met    ' if c['met'] else 'NOT met'} {c['set']:<10}{c['value']:>8.3f}  {c['target']}")
EOF
  else
    echo "benchmark: no $OUT/bench.json"
  fi
  if [ -f "$OUT/kernel-shapes.json" ]; then
    echo
    timeout 60 "$PY" "$ROOT/tools/kernel_shapes.py" --summary "$OUT/kernel-shapes.json" ||
      echo "kernel shapes: could not read kernel-shapes.json"
  fi
  echo
  if ((FAILED)); then
    echo "GPU CHECK: FAILED (see above and $LOG)"
  else
    echo "GPU CHECK: all stages passed"
  fi
}

main() {
  local t0=$SECONDS
  versions
  record versions ok $((SECONDS - t0))

  if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    run_stage wheels 120 250 "$ROOT" - "$PY" -m pip install --no-index --no-deps "$ROOT"/.whl/*.whl
  else
    echo "(no wheels in .whl/: bitsandbytes, expecttest etc. are used only if preinstalled)"
  fi

  pick_compiler

  # A stale lion_ops from an earlier run on this machine must not be tested if the build fails.
  "$PY" -m pip uninstall -y -q lion_ops >/dev/null 2>&1 || true
  # No build isolation: the library must be built against the installed torch. --no-index: no
  # network here; torch, the only dependency, is installed.
  if run_stage build 300 250 "$ROOT" "$OUT/build.log" \
      env LION_OPS_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$PY" -m pip install --no-build-isolation --no-index --no-deps -v .; then
    grep -E "lion_ops:|Successfully installed" "$OUT/build.log" || true
  else
    echo "--- last 60 lines of $OUT/build.log:"
    tail -n 60 "$OUT/build.log"
  fi

  # From $OUT, not the repository root, so that `import lion_ops` finds the installed package.
  run_stage smoke 90 240 "$OUT" - "$PY" -c "$SMOKE"

  # pytest: `python -m pytest` puts the current directory first on sys.path, so run from the
  # repository root it would import the unbuilt ./lion_ops source tree instead of the installed
  # package. Run from tests/ it puts tests/ there (which pytest adds for conftest.py anyway); the
  # rootdir and the markers still come from ../pyproject.toml. The `pytest` command would also
  # work from the root (it does not add the current directory), but it may belong to another
  # interpreter than $PY, the one lion_ops was just installed into; `$PY -m pytest` cannot.
  # The suite runs in two parts, the CUDA tests and the rest, so nothing runs twice.
  export LION_OPS_REQUIRE_CUDA_BUILD=1
  local pytest_args=(-rs -p no:cacheprovider -o console_output_style=classic)
  # 16 cores: run the tests in parallel when pytest-xdist is there (a crashing test then costs
  # one worker, not the rest of the suite), each worker with a share of the CPU threads.
  if "$PY" -c "import xdist" 2>/dev/null; then
    pytest_args+=(-n 6)
    export OMP_NUM_THREADS=$(( $(nproc) / 6 > 0 ? $(nproc) / 6 : 1 ))
  fi
  run_stage tests-cuda 200 240 "$ROOT/tests" - \
    "$PY" -m pytest . -m cuda "${pytest_args[@]}" --junitxml="$OUT/junit-cuda.xml"
  local counts
  counts=$(junit_counts "$OUT/junit-cuda.xml")
  if [ -n "$counts" ] && [ "${counts%% *}" = 0 ]; then
    echo "[tests-cuda] no CUDA test passed"
    record tests-cuda "FAILED (no CUDA test passed)" 0
  fi
  local test_threads=${OMP_NUM_THREADS:-}
  unset OMP_NUM_THREADS  # the benchmark's CPU peers get every thread
  run_stage bench 300 80 "$ROOT" - \
    "$PY" tools/benchmark.py --quick --json "$OUT/bench.json" --png "$OUT/bench.png"

  # Where a step's host time goes, and how long the device waits for it (tools/host_timeline.py):
  # at 9f9f246 a Lion8bit gpt2 step took 1.18 ms around 0.49 ms of kernels.
  run_stage host-timeline 60 200 "$ROOT" - \
    "$PY" tools/host_timeline.py --json "$OUT/host-timeline.json"

  # Shapes of the 32-bit kernel (span per block, loads in flight, cache hints) and of the 8-bit
  # one (encoder, register budget), checked bit for bit and timed against the library's and, for
  # 32-bit, the two fastest peers (tools/kernel_shapes.py): at 6ebab5a the 32-bit kernel was 3%
  # behind torch.compile's foreach loop back to back on llama1b, the 8-bit one at 73-80% of copy.
  if ((BUDGET - SECONDS >= 120)); then
    run_stage kernel-shapes 150 45 "$OUT" - \
      "$PY" "$ROOT/tools/kernel_shapes.py" --json "$OUT/kernel-shapes.json"
  else
    echo "[kernel-shapes] skipped: less than 120 s of the budget left"
    record kernel-shapes "skipped (no time left)" 0
  fi

  # Nsight Compute, where installed and time is left: the achieved DRAM bandwidth of each of
  # our kernels, on the gpt2 shapes (500 MB of fp32 params: well past the L2).
  local ncu
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  if [ -z "$ncu" ]; then
    echo "[ncu] skipped: Nsight Compute (ncu) is not installed"
    record ncu "skipped (no ncu)" 0
  elif ((BUDGET - SECONDS < 75)); then
    echo "[ncu] skipped: less than 75 s of the budget left"
    record ncu "skipped (no time left)" 0
  else
    run_stage ncu 150 15 "$OUT" "$OUT/ncu.csv" \
      "$ncu" --csv --page raw --kernel-name "regex:lion_(32|8)bit_kernel|static_scales" \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
      "$PY" "$ROOT/tools/ncu_workload.py" gpt2
    "$PY" "$ROOT/tools/ncu_summary.py" "$OUT/ncu.csv" || tail -n 20 "$OUT/ncu.csv" | cut -c1-400
    # What bounds the update kernels below the copy bandwidth (the 8-bit one moves 73-80% of
    # it): throughput of each unit, occupancy, and where warps stall, from ncu's own sections
    # (a separate run, so that a section this ncu lacks cannot cost the figures above).
    if ((BUDGET - SECONDS >= 150)); then
      run_stage ncu-sections 90 60 "$OUT" "$OUT/ncu-sections.csv" \
        "$ncu" --csv --page raw --kernel-name "regex:lion_(32|8)bit_kernel" --launch-count 6 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        "$PY" "$ROOT/tools/ncu_workload.py" gpt2
      "$PY" "$ROOT/tools/ncu_summary.py" "$OUT/ncu-sections.csv" || tail -n 5 "$OUT/ncu-sections.csv"
    else
      echo "[ncu-sections] skipped: less than 150 s of the budget left"
      record ncu-sections "skipped (no time left)" 0
    fi
  fi

  # The CPU step on this machine's many cores (the build machine has 2): whether the 8-bit step,
  # compute-bound on 2 cores, keeps up with the 32-bit one where memory bandwidth is shared by
  # more cores. Ours and the compiled foreach loop only, gpt2 shapes. It takes what the budget
  # has left but 15 s (the CPU tests after it run in CI anyway).
  run_stage bench-cpu 150 15 "$ROOT" - \
    "$PY" tools/benchmark.py --device cpu --sets gpt2 --peers compiled --repeats 8 \
    --overhead-steps 0 --json "$OUT/bench-cpu.json"

  # Last: the CPU tests (CI runs them too; here they check this machine's build of the CPU paths).
  # Not the CUDA emulation (CI's stand-in for this machine's GPU, which ran the real kernels).
  # They take about 100 s with 6 workers: with less than 120 s left they are skipped (at 23ce9b5
  # they started with 27 s left, timed out, and the run read as failed).
  [ -n "$test_threads" ] && export OMP_NUM_THREADS=$test_threads
  if ((BUDGET - SECONDS < 120)); then
    echo
    echo "[tests-rest] skipped: less than 120 s of the budget left (CI runs these tests)"
    record tests-rest "skipped (no time left)" 0
  else
    run_stage tests-rest 200 5 "$ROOT/tests" - \
      "$PY" -m pytest . -m "not cuda" --ignore=test_cuda_emulated.py "${pytest_args[@]}" \
      --junitxml="$OUT/junit-rest.xml"
  fi

  summary
  bundle_extras
  return "$FAILED"
}

# The GPU machine's tool returns at most 8 files from $OUT (at 23ce9b5 it dropped ncu.csv): the
# JUnit reports, the build log and the Nsight Compute sections (all summarized in the log) go
# into one archive, extras.tar.gz, leaving at most 8 files.
bundle_extras() {
  local extras=() f
  for f in "$OUT"/junit-*.xml "$OUT"/build.log "$OUT"/ncu-sections.csv; do
    [ -f "$f" ] && extras+=("$(basename "$f")")
  done
  ((${#extras[@]})) || return 0
  tar -C "$OUT" -czf "$OUT/extras.tar.gz" "${extras[@]}" && (cd "$OUT" && rm -f "${extras[@]}")
  echo "(${extras[*]} are in $OUT/extras.tar.gz)"
}

main "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
