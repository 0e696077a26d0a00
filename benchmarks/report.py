"""Medians, ranges, ratios and targets, as a text table or markdown.

Each scenario names its baselines (the ratio columns) and its subject (the row its targets
judge): selectserver against threads/asyncio/rawselect, or ``proxied`` against ``selectserver``
direct. The table has one ratio column per baseline of the scenarios shown, in order of first
use; a row has a ratio only in its own scenario's columns.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .scenarios import Metric, Scenario, Target

__all__ = ["Results", "Row", "markdown", "rows", "target_lines", "text"]


class Results:
    """Every sample, by scenario key, metric name and implementation."""

    def __init__(self) -> None:
        self.samples: defaultdict[tuple[str, str, str], list[float]] = defaultdict(list)

    def add(self, scenario: Scenario, impl: str, values: dict[str, float]) -> None:
        """Record one run of ``scenario`` by ``impl``."""
        for name, value in values.items():
            self.samples[scenario.key, name, impl].append(value)

    def median(self, scenario: Scenario, metric: str, impl: str) -> float | None:
        """The median of ``impl``'s samples, or None if it has none."""
        values = self.samples.get((scenario.key, metric, impl))
        return statistics.median(values) if values else None


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    scenario: str
    metric: Metric
    impl: str
    median: float
    low: float
    high: float
    samples: int
    ratios: dict[str, float | None]
    target: Target | None
    passed: bool | None


def rows(scenarios: Iterable[Scenario], results: Results, impls: Sequence[str]) -> list[Row]:
    """The table's rows: every metric of every scenario, one row per implementation."""
    table: list[Row] = []
    for scenario in scenarios:
        for metric in scenario.metrics:
            medians = {
                impl: results.median(scenario, metric.name, impl)
                for impl in scenario.impls
                if impl in impls
            }
            found = {impl: value for impl, value in medians.items() if value is not None}
            target = next((t for t in scenario.targets if t.metric == metric.name), None)
            for impl, value in found.items():
                values = results.samples[scenario.key, metric.name, impl]
                ratios = {
                    base: (value / found[base] if base != impl and found.get(base) else None)
                    for base in scenario.baselines
                }
                mine = target if impl == scenario.subject else None
                table.append(
                    Row(
                        scenario.label,
                        metric,
                        impl,
                        value,
                        min(values),
                        max(values),
                        len(values),
                        ratios,
                        mine,
                        None if mine is None else mine.passes(value, found),
                    )
                )
    return table


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _verdict(row: Row) -> tuple[str, str]:
    if row.target is None:
        return "", ""
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}[row.passed]
    return row.target.describe(), verdict


def _baselines(table: Sequence[Row]) -> list[str]:
    """The ratio columns: every baseline of the rows' scenarios, in order of first use."""
    return list(dict.fromkeys(base for row in table for base in row.ratios))


def _header(baselines: Sequence[str]) -> tuple[str, ...]:
    return (
        "scenario",
        "metric",
        "implementation",
        "median",
        "min-max",
        *(f"vs {base}" for base in baselines),
        "target",
        "pass",
    )


def _cells(row: Row, baselines: Sequence[str]) -> tuple[str, ...]:
    return (
        row.scenario,
        row.metric.unit + (" (higher is better)" if row.metric.higher_is_better else ""),
        row.impl,
        _number(row.median),
        f"{_number(row.low)}-{_number(row.high)}",
        *(_ratio(row.ratios.get(base)) for base in baselines),
        *_verdict(row),
    )


def text(table: Sequence[Row]) -> str:
    """The table as aligned plain text."""
    baselines = _baselines(table)
    header = _header(baselines)
    lines = [header, *(_cells(row, baselines) for row in table)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def markdown(table: Sequence[Row]) -> str:
    """The table as GitHub markdown."""
    baselines = _baselines(table)
    header = _header(baselines)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row, baselines)) + " |" for row in table]
    return "\n".join(lines)


def target_lines(table: Sequence[Row]) -> list[str]:
    """One line per target: what was measured and whether it passed."""
    lines = []
    for row in table:
        if row.target is None:
            continue
        base = row.target.baseline
        ratio = "" if base is None else f" = {_ratio(row.ratios.get(base))} {base}"
        describe, verdict = _verdict(row)
        lines.append(
            f"{verdict:4}  {row.scenario} {row.metric.unit}: {_number(row.median)}{ratio}"
            f" (target {describe})"
        )
    return lines
