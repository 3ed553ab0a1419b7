"""SQuAD v1.1 exact match and token F1 as an offline `evaluate.Metric`.

Answers are normalised before comparison: lower-cased, ASCII punctuation removed, the articles a/an/the removed,
whitespace collapsed. Each question scores the best match over its gold answers; the corpus scores are means over
all references, in percent (0-100). A reference whose id has no prediction scores 0.
"""
from __future__ import annotations

import re
import string
import warnings
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "SQuAD v1.1 exact match and token-level F1 (percent), maximised over the gold answers."
_CITATION = """@inproceedings{rajpurkar2016squad,
  title={{SQuAD}: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={Proceedings of EMNLP},
  year={2016}
}"""
_INPUTS = """
Args:
    predictions: list of {"id": str, "prediction_text": str}.
    references: list of {"id": str, "answers": {"text": [str, ...], "answer_start": [int, ...]}}.
Returns: {"exact_match": float, "f1": float}, both in percent.
"""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop articles, collapse whitespace (the order of the official script)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 between normalised answers, in [0, 1]; no shared token (including both empty) gives 0."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    shared = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred_tokens), shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions, references) -> dict[str, float]:
    """Corpus EM and F1 in percent; predictions are matched to references by id."""
    by_id = {p["id"]: p["prediction_text"] for p in predictions}
    missing = [r["id"] for r in references if r["id"] not in by_id]
    if missing:
        warnings.warn(f"{len(missing)} of {len(references)} questions have no prediction and score 0", stacklevel=2)
    if not references:
        return {"exact_match": float("nan"), "f1": float("nan")}
    em = f1 = 0.0
    for ref in references:
        if ref["id"] not in by_id:
            continue
        prediction, golds = by_id[ref["id"]], list(ref["answers"]["text"])
        em += max((exact_match_score(prediction, g) for g in golds), default=0.0)
        f1 += max((f1_score(prediction, g) for g in golds), default=0.0)
    return {"exact_match": 100.0 * em / len(references), "f1": 100.0 * f1 / len(references)}


class Squad(evaluate.Metric):
    """`Squad()`; pass `keep_in_memory=True` to avoid writing arrow cache files."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({
                "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                "references": {
                    "id": datasets.Value("string"),
                    "answers": {
                        "text": datasets.List(datasets.Value("string")),
                        "answer_start": datasets.List(datasets.Value("int32")),
                    },
                },
            }),
            homepage="https://rajpurkar.github.io/SQuAD-explorer/",
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return squad_scores(predictions, references)
