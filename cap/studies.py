"""What every study's report computes the same way: mean ± sample std over seeds, differences paired by seed,
markdown tables and a bare figure. `cap.report` and the study scripts (`scripts/*_report.py`, `time_main_job.py`)
read these; each keeps only its own rows and rule."""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence


def mean_std(values: Iterable[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for a single value)."""
    values = list(values)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(mean: float, std: float | None = None, sign: str = "") -> str:
    """`81.23 ± 0.45` (two decimals; `sign="+"` shows the sign of a difference), or the mean alone without a std."""
    return f"{mean:{sign}.2f}" + ("" if std is None else f" ± {std:.2f}")


def fmt_values(values: Iterable[float], sign: str = "") -> str:
    """`fmt` of the mean ± sample std of `values`."""
    return fmt(*mean_std(values), sign=sign)


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[list[int], list[float]]:
    """The seeds both have, and a - b for each of them."""
    seeds = sorted(a.keys() & b.keys())
    return seeds, [a[s] - b[s] for s in seeds]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def figure(width: float, height: float):
    """A bare matplotlib Figure: it renders PNG with Agg and leaves pyplot's backend alone."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))
