"""cap.studies: what every study report computes alike."""
from cap.studies import fmt, fmt_values, markdown_table, mean_std, paired


def test_mean_and_sample_std_and_their_format():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, None)  # one seed: no spread, and none is shown
    assert fmt(81.234, 0.456) == "81.23 ± 0.46"
    assert fmt(2.5, None, "+") == "+2.50"
    assert fmt_values([-1.0, -3.0], sign="+") == "-2.00 ± 1.41"


def test_differences_are_paired_by_the_seeds_both_have():
    seeds, diffs = paired({1: 80.0, 2: 82.0, 3: 81.0}, {2: 79.0, 1: 78.5, 4: 70.0})
    assert seeds == [1, 2] and diffs == [1.5, 3.0]
    assert paired({1: 1.0}, {}) == ([], [])


def test_markdown_table_lines():
    assert markdown_table(["a", "b"], [[1, "x"], [2.5, ""]]) == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 |  |"]
