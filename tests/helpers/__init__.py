"""Helpers shared by the end-to-end tests: composing the real Hydra config with tiny-run overrides."""
from pathlib import Path

from hydra import compose, initialize_config_dir

import cap  # noqa: F401  registers the config schema (cap/config.py), which conf/config.yaml starts from

REPO = Path(__file__).resolve().parents[2]
# offline, MNLI and QQP have only a held-out split (see ../shared/data/README.md)
OFFLINE_EVAL = {"mnli": "heldout", "qqp": "heldout"}


def tiny_overrides(model_dir, task):
    overrides = [f"task={task}", f"model.name_or_path={model_dir}", "data.max_train_samples=16",
                 "data.max_eval_samples=12", "trainer.max_steps=2", "trainer.batch_size=8", "trainer.logging_steps=1"]
    if task in OFFLINE_EVAL:
        overrides.append(f"data.eval_split={OFFLINE_EVAL[task]}")
    if task == "squad":
        overrides += ["data.max_seq_length=128", "data.doc_stride=32"]
    return overrides


def composed(overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)
