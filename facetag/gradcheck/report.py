"""Turn gradient-check results into one row per op and a plain-text table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from facetag.gradcheck.core import FD_TOLERANCE, TORCH_TOLERANCE, CaseResult


def summarise(results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """One row per op: its worst case's errors, and whether every case passed."""
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        row = rows.setdefault(
            r.op,
            {
                "op": r.op,
                "cases": 0,
                "fd_error": 0.0,
                "torch_error": 0.0,
                "passed": True,
                "failures": [],
            },
        )
        row["cases"] = int(row["cases"]) + 1
        fd = r.fd_error if not math.isnan(r.fd_error) else math.inf
        te = r.torch_error if not math.isnan(r.torch_error) else math.inf
        row["fd_error"] = max(float(row["fd_error"]), fd)
        row["torch_error"] = max(float(row["torch_error"]), te)
        if not r.passed:
            row["passed"] = False
            why = r.error or (
                "gradcheck failed"
                if not r.gradcheck_ok
                else f"fd {r.fd_error:.1e} / torch {r.torch_error:.1e}"
            )
            row["failures"].append(f"{r.name}: {why}")
    return list(rows.values())


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """op | cases | max abs err vs finite differences | max rel err vs torch | pass."""
    head = ("op", "cases", "max |err| vs finite diff", "max rel err vs torch", "result")
    body = [
        (
            str(r["op"]),
            str(r["cases"]),
            f"{r['fd_error']:.2e}",
            f"{r['torch_error']:.2e}",
            "pass" if r["passed"] else "FAIL",
        )
        for r in rows
    ]
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r, b in zip(rows, body, strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))
        for failure in r["failures"]:
            lines.append(f"    {failure}")
    n_fail = sum(not r["passed"] for r in rows)
    lines.append(
        f"\n{len(rows) - n_fail} of {len(rows)} ops pass "
        f"(float64 finite differences within {FD_TOLERANCE:g}, float32 vs torch within "
        f"{TORCH_TOLERANCE:g} relative)"
    )
    return "\n".join(lines)
