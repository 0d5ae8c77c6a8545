"""How `kaizen eval` prints a suite result and a paired comparison (torch-free, no I/O)."""

from __future__ import annotations

from typing import Any


def result_line(report: dict[str, Any], cached: bool) -> str:
    truncation = report.get("truncation_rate")
    parts = [
        f"{report['suite']} on {report['checkpoint']}: {report['score']:.3f} "
        f"(n={report['n']}, 95% CI {report['ci_low']:.3f}-{report['ci_high']:.3f})",
        "cached" if cached else f"{report['seconds']:.1f}s",
    ]
    if truncation is not None:
        parts.append(f"truncated {truncation:.0%}")
    if report.get("looping"):
        parts.append(f"{report['looping']} looping")
    if report.get("unreadable"):
        parts.append(f"{report['unreadable']} unreadable verdicts")
    return "; ".join(parts)


def per_kind_line(report: dict[str, Any]) -> str | None:
    rates = report.get("per_kind") or {}
    if not rates:
        return None
    return "  per constraint: " + ", ".join(f"{kind} {rate:.2f}" for kind, rate in sorted(rates.items()))


def paired_line(against: str, paired: dict[str, Any]) -> str:
    return (
        f"  vs {against}: {paired['b_score']:.3f} -> {paired['a_score']:.3f}; difference {paired['difference']:+.3f}, "
        f"{paired['confidence']:.0%} paired-bootstrap CI [{paired['low']:+.3f}, {paired['high']:+.3f}] over {paired['n']} items; "
        f"smallest detectable difference at this n: {paired['minimum_detectable']:.3f}"
    )
