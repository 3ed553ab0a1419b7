"""What several test modules share: the real Hydra config composed with tiny-run overrides, each method's tiny
run, and fake run dirs for the reports."""
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cap  # noqa: F401  registers the config schema (cap/config.py), which conf/config.yaml starts from

REPO = Path(__file__).resolve().parents[2]
# offline, MNLI and QQP have only a held-out split (see ../shared/data/README.md)
OFFLINE_EVAL = {"mnli": "heldout", "qqp": "heldout"}
MOVEMENT_EPOCHS = 3  # the tiny movement runs' epochs (tests/test_cap_m.py)


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


# ---- tiny runs of each method

def cap_f_overrides(model_dir, sst2_teacher_dir, *extra):
    return [*tiny_overrides(model_dir, "sst2"), "method=cap_f", f"teacher.path={sst2_teacher_dir}",
            "prune.sequence=[0.25,0.5,0.75]", "contrast.extra_examples=8", *extra]


def movement_overrides(model_dir, sst2_teacher_dir, method="cap_m", *extra):
    overrides = [*tiny_overrides(model_dir, "sst2"), f"method={method}", f"teacher.path={sst2_teacher_dir}",
                 "trainer.max_steps=-1", f"trainer.epochs={MOVEMENT_EPOCHS}", "data.max_train_samples=32",
                 "trainer.warmup=1", "prune.initial_warmup=1", "prune.final_warmup=1", "contrast.extra_examples=8"]
    return [*overrides, *extra]


# ---- run dirs as the recipes and Hydra leave them, for the reports

def fake_run(path, task, method, seed, rows, hydra=True, **config):
    """A run dir as the recipes and Hydra leave it: metrics.json rows and the run's config."""
    cfg = OmegaConf.merge({"task": {"name": task}, "method": {"name": method}, "seed": seed,
                           "model": {"name_or_path": "minilm"}}, config)
    config_path = path / ".hydra" / "config.yaml" if hydra else path / "config.yaml"
    config_path.parent.mkdir(parents=True)
    OmegaConf.save(cfg, config_path)
    (path / "metrics.json").write_text(json.dumps(rows))
    return path


def cap_f_rows(acc50, acc90):
    return [{"stage": i, "method": "cap_f", "step": 10 * i, "sparsity": s, "split": "validation", "accuracy": a,
             "sparsity_heads": s} for i, (s, a) in enumerate([(0.5, acc50), (0.9, acc90)], 1)]


def cap_m_rows(final_acc, final_f1):
    rows = [{"stage": epoch, "method": "cap_m", "step": 5 * epoch, "sparsity": 0.9004, "split": "heldout",
             "accuracy": 0.5, "f1": 0.4, "sparsity_entries": 0.9004} for epoch in (1, 2)]
    return rows + [{**rows[0], "stage": 3, "accuracy": final_acc, "f1": final_f1}]
