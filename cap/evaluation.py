"""Evaluate a model on the task's eval splits: GLUE metrics from logits, SQuAD EM/F1 from post-processed spans."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cap.data import TaskData, postprocess_qa_predictions
from cap.metrics import load_metric
from cap.io import write_json_atomic

QA_FEATURE_ONLY = ("example_id", "offset_mapping")


def evaluate_task(trainer, data: TaskData, *, out_dir: Path | None = None, n_best_size: int = 20,
                  max_answer_length: int = 30) -> dict[str, dict[str, float]]:
    """{split: {metric: value}} for every eval split; QA answers go to `out_dir/predictions.json` ({split: {id: text}})."""
    spec = data.spec
    results, predictions = {}, {}
    for split, features in data.evals.items():
        model_inputs = features.remove_columns([c for c in (*QA_FEATURE_ONLY, "idx") if c in features.column_names])
        output = trainer.predict(model_inputs, metric_key_prefix=f"eval_{split}")
        if spec.is_qa:
            start_logits, end_logits = output.predictions[:2]
            answers = postprocess_qa_predictions(data.eval_examples[split], features, start_logits, end_logits,
                                                 n_best_size=n_best_size, max_answer_length=max_answer_length)
            examples = data.eval_examples[split]
            metrics = load_metric(spec.name).compute(
                predictions=[{"id": i, "prediction_text": answers[i]} for i in examples["id"]],
                references=[{"id": e["id"], "answers": e["answers"]} for e in examples],
            )
            predictions[split] = answers
        else:
            logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
            preds = logits[:, 0] if spec.is_regression else np.argmax(logits, axis=-1)
            metrics = load_metric(spec.name).compute(predictions=preds, references=output.label_ids)
        results[split] = {k: float(v) for k, v in metrics.items()}
    if predictions and out_dir is not None:
        write_json_atomic(out_dir / "predictions.json", predictions)
    return results
