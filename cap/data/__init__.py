"""Data: GLUE and SQuAD v1.1, from a local copy (`data.dir` / CAP_DATA_DIR) or the Hugging Face hub.

`load_task_data(task, tokenizer, ...)` is the entry point; the readers, tokenisers and SQuAD post-processing are
exported for tests and tools."""
from cap.data.common import subsample
from cap.data.glue import read_glue_split, tokenize_glue
from cap.data.loading import TaskData, load_task_data
from cap.data.squad import (
    postprocess_qa_predictions, prepare_eval_features, prepare_train_features, read_squad_split, tokenize_squad,
)
from cap.data.tasks import TASKS, DataError, TaskSpec, get_task

__all__ = [
    "DataError", "TASKS", "TaskData", "TaskSpec", "get_task", "load_task_data", "postprocess_qa_predictions",
    "prepare_eval_features", "prepare_train_features", "read_glue_split", "read_squad_split", "subsample",
    "tokenize_glue", "tokenize_squad",
]
