#!/usr/bin/env python3
"""A short reading of an Nsight Compute raw CSV (`ncu --csv --page raw ...`): per profiled
kernel, its time, the throughput of each unit as a share of its peak, the achieved
occupancy, and the warp stall reasons that cost the most. tools/gpu_check.sh prints it for
ncu-sections.csv, whose hundreds of columns do not fit in a log's tail.

    python tools/ncu_summary.py ncu-sections.csv

Columns a given ncu version does not have are left out; nothing is computed that ncu did
not measure.
"""

from __future__ import annotations

import csv
import sys

# (label, column) in the order printed, where present.
_UNITS = [
    ("dram", "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("L2", "lts__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("L1/tex", "l1tex__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("SM", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("issue", "sm__inst_issued.avg.pct_of_peak_sustained_active"),
    ("occupancy", "sm__warps_active.avg.pct_of_peak_sustained_active"),
]
_STALL_PREFIX = "smsp__average_warps_issue_stalled_"
_STALL_SUFFIX = "_per_issue_active.ratio"


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarize(lines: list[str]) -> list[str]:
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return ["no ncu table found"]
    rows = list(csv.reader(lines[start:]))
    header, body = rows[0], rows[1:]
    # The raw page's second row holds units; kernel rows have a numeric ID.
    kernels = [dict(zip(header, row)) for row in body if row and row[0].strip().isdigit()]
    out = []
    for kernel in kernels:
        name = kernel.get("Kernel Name", "?").split("(")[0].removeprefix("void ")
        time_ns = _number(kernel.get("gpu__time_duration.sum", ""))
        parts = [f"{name} grid {kernel.get('Grid Size', '?')} block {kernel.get('Block Size', '?')}"
                 f" regs {kernel.get('launch__registers_per_thread', '?')}"]
        if time_ns is not None:
            parts.append(f"{time_ns / 1e3:.1f} us")
        units = [(label, _number(kernel.get(column, ""))) for label, column in _UNITS]
        parts.append(" ".join(f"{label} {value:.0f}%" for label, value in units
                              if value is not None))
        stalls = sorted(((column[len(_STALL_PREFIX):-len(_STALL_SUFFIX)], _number(value))
                         for column, value in kernel.items()
                         if column.startswith(_STALL_PREFIX) and column.endswith(_STALL_SUFFIX)
                         and "not_issued" not in column),
                        key=lambda item: -(item[1] or 0.0))
        if stalls:
            parts.append("stalls (cycles per issue): " + ", ".join(
                f"{reason} {value:.2f}" for reason, value in stalls[:4] if value is not None))
        out.append("; ".join(part for part in parts if part))
    return out or ["no kernel rows"]


def main() -> int:
    if len(sys.argv) == 2 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for line in summarize(lines):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
