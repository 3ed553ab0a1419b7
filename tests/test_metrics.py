"""cap.metrics: GLUE metrics against scikit-learn/scipy, SQuAD EM/F1 on hand-computed cases, offline loading."""
import socket

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from cap.metrics import (GLUE_TASKS, KNOWN_TASKS, compute_glue, load_metric, main_metric, metric_names,
                         normalize_answer)

NUM_LABELS = {"mnli": 3, "mnli_matched": 3, "mnli_mismatched": 3}
EXPECTED_KEYS = {
    "cola": ["matthews_correlation"], "stsb": ["pearson", "spearmanr"],
    "mrpc": ["accuracy", "f1"], "qqp": ["accuracy", "f1"], "squad": ["exact_match", "f1"],
}


@pytest.fixture(autouse=True)
def _metrics_cache(tmp_path, monkeypatch):
    """Keep evaluate's cache folder out of the user's home."""
    import evaluate.config

    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", str(tmp_path / "metrics-cache"))


def _random_labels(task, n=200, seed=0):
    rng = np.random.default_rng(seed)
    if task == "stsb":
        refs = rng.uniform(0, 5, n)
        return refs + rng.normal(0, 1.0, n), refs
    k = NUM_LABELS.get(task, 2)
    refs = rng.integers(0, k, n)
    preds = np.where(rng.random(n) < 0.7, refs, rng.integers(0, k, n))  # correlated, not perfect
    return preds, refs


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_glue_matches_sklearn_and_scipy(task):
    preds, refs = _random_labels(task, seed=len(task))
    result = load_metric(task).compute(predictions=preds, references=refs)
    assert list(result) == EXPECTED_KEYS.get(task, ["accuracy"]) == metric_names(task)
    if task == "stsb":
        assert result["pearson"] == pytest.approx(pearsonr(preds, refs)[0], abs=1e-12)
        assert result["spearmanr"] == pytest.approx(spearmanr(preds, refs)[0], abs=1e-12)
    elif task == "cola":
        assert result["matthews_correlation"] == pytest.approx(matthews_corrcoef(refs, preds), abs=1e-12)
    else:
        assert result["accuracy"] == pytest.approx(accuracy_score(refs, preds), abs=1e-12)
        if task in ("mrpc", "qqp"):
            assert result["f1"] == pytest.approx(f1_score(refs, preds), abs=1e-12)
    assert 0 < abs(result[main_metric(task)]) < 1


def test_glue_accepts_lists_float32_and_trainer_like_arrays():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.3, 0.2], [-1.0, 1.0]], dtype=np.float32)
    labels = np.array([1, 0, 1, 1])
    assert compute_glue("mrpc", np.argmax(logits, -1), labels) == {"accuracy": 0.75, "f1": pytest.approx(0.8)}
    assert compute_glue("sst2", [1, 0, 0, 1], [1, 0, 1, 1]) == {"accuracy": 0.75}
    stsb = compute_glue("stsb", np.array([0.5, 1.0, 4.0], dtype=np.float32), np.array([1.0, 2.0, 3.0], np.float32))
    assert stsb["spearmanr"] == pytest.approx(1.0)
    assert all(type(v) is float for v in stsb.values())


def test_main_metric_and_names():
    assert main_metric("cola") == "matthews_correlation"
    assert main_metric("stsb") == "pearson"
    assert main_metric("mrpc") == "f1"
    assert main_metric("qqp") == "accuracy"
    assert main_metric("squad") == "f1"
    assert [main_metric(t) for t in ("sst2", "mnli", "qnli", "rte", "wnli")] == ["accuracy"] * 5
    assert metric_names("SST-2") == ["accuracy"] and metric_names("STS-B") == ["pearson", "spearmanr"]
    assert set(KNOWN_TASKS) == set(GLUE_TASKS) | {"squad"}
    for task in KNOWN_TASKS:
        assert main_metric(task) in metric_names(task)


def test_mnli_is_plain_accuracy_module():
    metric = load_metric("mnli")
    assert metric.config_name == "mnli"
    assert metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 2, 0]) == {"accuracy": 0.75}


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match="unknown task 'mnist'.*cola.*squad"):
        load_metric("mnist")
    with pytest.raises(ValueError, match="cola"):
        main_metric("imdb")


def _squad(pairs):
    """[(prediction, [gold, ...]), ...] -> EM/F1 from the squad module."""
    preds = [{"id": str(i), "prediction_text": p} for i, (p, _) in enumerate(pairs)]
    refs = [{"id": str(i), "answers": {"text": golds, "answer_start": [0] * len(golds)}}
            for i, (_, golds) in enumerate(pairs)]
    return load_metric("squad").compute(predictions=preds, references=refs)


def test_squad_exact_answer():
    assert _squad([("Denver Broncos", ["Denver Broncos"])]) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_normalisation_punctuation_and_articles():
    assert normalize_answer("  The Eiffel   Tower. ") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert _squad([("The Eiffel Tower.", ["eiffel tower"])]) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_max_over_gold_answers():
    # gold 1 "Paris": no shared token -> 0; gold 2 "city of Paris": exact; max -> 100/100
    assert _squad([("city of paris", ["Paris, France", "City of Paris"])]) == {"exact_match": 100.0, "f1": 100.0}
    # "Paris" vs "Paris, France" -> P 1/1, R 1/2, F1 2/3; vs "France" -> 0; max F1 = 66.67, no exact match
    result = _squad([("Paris", ["Paris, France", "France"])])
    assert result["exact_match"] == 0.0
    assert result["f1"] == pytest.approx(200 / 3)


def test_squad_partial_overlap():
    # "in the big red house" -> ["in", "big", "red", "house"]; "the red house" -> ["red", "house"]
    # shared 2: precision 2/4, recall 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3 -> 66.67
    result = _squad([("in the big red house", ["the red house"])])
    assert result["exact_match"] == 0.0
    assert result["f1"] == pytest.approx(200 / 3)


def test_squad_repeated_tokens_count_once_per_occurrence():
    # ["red", "red", "red"] vs ["red", "house"]: shared min(3, 1) = 1; P 1/3, R 1/2, F1 = 2/5 -> 40
    assert _squad([("red red red", ["red house"])])["f1"] == pytest.approx(40.0)


def test_squad_empty_prediction_scores_zero():
    assert _squad([("", ["Denver Broncos"])]) == {"exact_match": 0.0, "f1": 0.0}
    assert _squad([("the.", ["Denver Broncos"])]) == {"exact_match": 0.0, "f1": 0.0}  # normalises to empty


def test_squad_averages_over_questions():
    # per question EM/F1: 100/100, 0/66.67 (partial case above), 0/0, 100/100 -> EM 50, F1 (200 + 200/3) / 4
    result = _squad([
        ("Denver Broncos", ["Denver Broncos", "The Broncos"]),
        ("in the big red house", ["the red house"]),
        ("Carolina", ["Denver"]),
        ("1990s", ["the 1990s"]),
    ])
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx((200 + 200 / 3) / 4)


def test_squad_matches_by_id_and_missing_prediction_scores_zero():
    refs = [{"id": "q1", "answers": {"text": ["red"], "answer_start": [0]}},
            {"id": "q2", "answers": {"text": ["blue"], "answer_start": [0]}}]
    preds = [{"id": "q2", "prediction_text": "blue"}, {"id": "q1", "prediction_text": "red"}]  # other order
    assert load_metric("squad").compute(predictions=preds, references=refs) == {"exact_match": 100.0, "f1": 100.0}
    with pytest.warns(UserWarning, match="1 of 2 questions have no prediction"):
        result = load_metric("squad").compute(predictions=[preds[1], {"id": "q3", "prediction_text": "x"}],
                                              references=refs)
    assert result == {"exact_match": 50.0, "f1": 50.0}


def test_loading_is_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for task in KNOWN_TASKS:
        metric = load_metric(task)
        assert metric.name == ("squad" if task == "squad" else "glue")
    assert load_metric("rte").compute(predictions=[1, 0], references=[1, 1]) == {"accuracy": 0.5}
    assert _squad([("a b", ["b"])]) == {"exact_match": 100.0, "f1": 100.0}  # the article "a" is dropped
    # predictions were kept in memory: no arrow cache file written
    cache = tmp_path / "metrics-cache"
    assert not [p for p in cache.rglob("*") if p.is_file()]
