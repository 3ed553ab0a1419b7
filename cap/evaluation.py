"""Evaluate a model on the task's eval splits: GLUE metrics from logits, SQuAD EM/F1 from post-processed spans."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cap.banks import by_length
from cap.data import TaskData, postprocess_qa_predictions
from cap.data.glue import NO_LABEL
from cap.io import write_json_atomic
from cap.metrics import load_metric

QA_FEATURE_ONLY = ("example_id", "offset_mapping")


def predict_split(trainer, data: TaskData, split: str, *, n_best_size: int = 20, max_answer_length: int = 30):
    """(predictions, references) of one eval split. GLUE: class ids [N] (STS-B: scores) and the gold labels [N],
    None for a split without labels (a test file); SQuAD: {id: answer text} and [{id, answers}]."""
    spec, features = data.spec, data.evals[split]
    unlabelled = not spec.is_qa and bool(np.all(np.asarray(features["labels"]) == NO_LABEL))
    drop = [c for c in (*QA_FEATURE_ONLY, "idx", *(["labels"] if unlabelled else [])) if c in features.column_names]
    inputs, prefix = features.remove_columns(drop), f"eval_{split}"
    if spec.is_qa:  # in dataset order: the n-best search reads the logits at padded positions too, so sorted
        output = trainer.predict(inputs, metric_key_prefix=prefix)  # batches would change its answers
    else:
        output = predict_by_length(trainer, inputs, metric_key_prefix=prefix)
    if spec.is_qa:
        examples = data.eval_examples[split]
        start_logits, end_logits = output.predictions[:2]
        answers = postprocess_qa_predictions(examples, features, start_logits, end_logits,
                                             n_best_size=n_best_size, max_answer_length=max_answer_length)
        return answers, [{"id": e["id"], "answers": e["answers"]} for e in examples]
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    preds = logits[:, 0] if spec.is_regression else np.argmax(logits, axis=-1)
    return preds, None if unlabelled else output.label_ids


def predict_by_length(trainer, features, **kwargs):
    """`trainer.predict(features)`; with data.group_by_length (`train_sampling_strategy="group_by_length"`) over the
    features sorted by length, so each batch is padded little, its predictions and labels put back in the features'
    order (a classifier's output for a feature is its own: the batch changes only float rounding)."""
    if trainer.args.train_sampling_strategy != "group_by_length" or len(features) < 2:
        return trainer.predict(features, **kwargs)
    order = np.asarray(by_length(features))
    output = trainer.predict(features.select(order), **kwargs)
    place = np.empty_like(order)
    place[order] = np.arange(len(order))

    def unsort(array):
        if array is None:
            return None
        if isinstance(array, (tuple, list)):
            return type(array)(unsort(a) for a in array)
        return array[place]

    return output._replace(predictions=unsort(output.predictions), label_ids=unsort(output.label_ids))


def score(task: str, predictions, references) -> dict[str, float]:
    """The task's metrics of `predict_split`'s output."""
    if isinstance(predictions, dict):  # SQuAD
        predictions = [{"id": r["id"], "prediction_text": predictions[r["id"]]} for r in references]
    return {k: float(v) for k, v in load_metric(task).compute(predictions=predictions, references=references).items()}


def evaluate_task(trainer, data: TaskData, *, out_dir: Path | None = None, n_best_size: int = 20,
                  max_answer_length: int = 30) -> dict[str, dict[str, float]]:
    """{split: {metric: value}} for every eval split ({} for a split without labels); QA answers go to
    `out_dir/predictions.json` ({split: {id: text}})."""
    results, predictions = {}, {}
    for split in data.evals:
        preds, references = predict_split(trainer, data, split, n_best_size=n_best_size,
                                          max_answer_length=max_answer_length)
        results[split] = {} if references is None else score(data.spec.name, preds, references)
        if data.spec.is_qa:
            predictions[split] = preds
    if predictions and out_dir is not None:
        write_json_atomic(out_dir / "predictions.json", predictions)
    return results
