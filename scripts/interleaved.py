"""Timing two things (or more) on a shared machine, for the benches that report a ratio (`bench_export.py`,
`bench_movement_speed.py`, `bench_contrastive.py`, `bench_train.py`).

Timing A once and then B once lets a change in the machine's load between the two masquerade as a speedup (a loaded
2-core machine turned the export bench's 0.134 into 0.642). So A and B are timed back to back in every round, the
order alternating from round to round, and the median of the per-round ratios B / A is reported with its range.
"""
import statistics
import time
from typing import Callable

import torch


def seconds_per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def interleaved_ratio(baseline: Callable[[], object], candidate: Callable[[], object], rounds: int = 9,
                      min_seconds: float = 0.3) -> dict:
    """Median over `rounds` of t(candidate) / t(baseline), both timed in every round (baseline first in even rounds,
    candidate first in odd ones). Each is called once to warm up; a measurement repeats the call until the baseline
    has taken about `min_seconds`. Returns the ratio, its range over rounds, each one's median seconds per call,
    the calls per measurement and the per-round ratios."""
    calls = max(1, round(min_seconds / seconds_per_call(baseline, 1)))
    seconds_per_call(candidate, 1)
    times = {"baseline": [], "candidate": []}
    fns = {"baseline": baseline, "candidate": candidate}
    for r in range(rounds):
        for name in (("baseline", "candidate") if r % 2 == 0 else ("candidate", "baseline")):
            times[name].append(seconds_per_call(fns[name], calls))
    ratios = [c / b for c, b in zip(times["candidate"], times["baseline"])]
    return {"ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
            "baseline_s": statistics.median(times["baseline"]), "candidate_s": statistics.median(times["candidate"]),
            "calls_per_round": calls, "ratios": ratios}


def interleaved_rounds(fns: dict[str, Callable[[], float]], rounds: int) -> list[dict[str, float]]:
    """Several things measured in every round, the order rotating from round to round (each goes first once every
    len(fns) rounds): one {name: value} per round, each value what its function returned (a time, a rate)."""
    names = list(fns)
    out = []
    for r in range(rounds):
        k = r % len(names)
        out.append({name: fns[name]() for name in names[k:] + names[:k]})
    return out


def forward_ratio(baseline, candidate, batch: int, seq: int, rounds: int = 9, min_seconds: float = 0.3,
                  seed: int = 0) -> dict:
    """`interleaved_ratio` of two models' forward passes (inference mode) on one batch of random token ids."""
    ids = torch.randint(1000, 30000, (batch, seq), generator=torch.Generator().manual_seed(seed))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        return interleaved_ratio(lambda: baseline(**inputs), lambda: candidate(**inputs), rounds, min_seconds)
