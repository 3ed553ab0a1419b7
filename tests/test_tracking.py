"""logger=wandb on a tiny job, offline: the metrics are read back from the run's own .wandb file; the W&B group and
tags computed from the config."""
import json
import struct
import time
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hydra.types import RunMode
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2

from helpers import composed, tiny_overrides

from cap.recipes import run
from cap.tracking import run_group, run_tags

FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
BLOCK = 32768


def read_wandb_records(path: Path):
    """Records of a .wandb file (a 7-byte header, then a LevelDB-style log of 32 KiB blocks)."""
    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def finished_records(path: Path, timeout: float = 30.0) -> list:
    """The records once W&B's writer process has written the closing `exit` record: under load, `wandb.finish()`
    can return while the file's tail is still being written."""
    deadline = time.time() + timeout
    while True:
        try:
            records = list(read_wandb_records(path))
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
        except DecodeError:
            pass
        assert time.time() < deadline, f"{path} has no complete exit record after {timeout} s"
        time.sleep(0.2)


def test_wandb_offline_logs_config_terms_and_metrics(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = composed(tiny_overrides(tiny_model_dir, "mrpc") + ["logger=wandb", "logger.group=g1", "logger.tags=[x]"])
    rows = run(cfg, tmp_path)
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history, summary, config = [], {}, {}
    for record in finished_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            assert record.run.run_group == "g1"
            assert list(record.run.tags) == ["x", "task:mrpc", "method:finetune", "sparsity:0", "seed:42"]
    assert config["task"]["name"] == "mrpc" and config["trainer"]["max_steps"] == 2
    train_logs = [h for h in history if "train/loss" in h]
    assert train_logs and all("train/loss_ce" in h for h in train_logs)
    assert summary["validation/f1"] == rows[0]["f1"]
    assert summary["validation/accuracy"] == rows[0]["accuracy"]


def test_log_model_logs_the_final_model_as_a_wandb_artifact(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(composed(tiny_overrides(tiny_model_dir, "rte") + ["logger=wandb", "logger.log_model=true"]), tmp_path)
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    artifacts = [r.artifact for r in finished_records(run_file) if r.WhichOneof("record_type") == "artifact"]
    assert [(a.type, a.name.split("-")[-1]) for a in artifacts] == [("model", "model")]
    files = {entry.path for a in artifacts for entry in a.manifest.contents}
    assert {"README.md", "config.json", "model.safetensors"} <= files  # the model card travels with it


def test_cap_f_stages_share_one_wandb_axis(data_dir, tiny_model_dir, sst2_teacher_dir, tmp_path, monkeypatch):
    """Each CAP-f stage is a Trainer counting updates from 0; W&B plots everything against `train/update`, the
    updates of the whole run, so the stages follow each other and each evaluation sits at its own update."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(composed(tiny_overrides(tiny_model_dir, "sst2") + [
        "logger=wandb", "method=cap_f", "prune.sequence=[0.25,0.5]", f"teacher.path={sst2_teacher_dir}"]), tmp_path)
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history, axes = [], {}
    for record in finished_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "metric" and record.metric.step_metric:
            axes[record.metric.glob_name or record.metric.name] = record.metric.step_metric
    assert axes.get("*") == "train/update"
    evaluations = [h["train/update"] for h in history if "train/validation/accuracy" in h]
    assert evaluations == [2, 4]  # trainer.max_steps=2 per stage: stage 2 continues where stage 1 ended
    losses = [h["train/update"] for h in history if "train/loss" in h]
    assert losses == sorted(losses) and losses[-1] > 2 >= losses[0]
    assert all("train/update" in h for h in history if "train/loss" in h or "train/validation/accuracy" in h)
    # the same records in the run's own log
    log = [json.loads(line) for line in (tmp_path / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["update"] for r in log if "validation/accuracy" in r] == [2, 4]
    assert [r["update"] for r in log if "loss" in r] == losses
    assert all("loss_ce" in r and "loss_prc" in r for r in log if "loss" in r and r["update"] > 2)


def test_training_log_keeps_soft_movement_curves_and_reads_as_one_run_after_a_resume(data_dir, tiny_model_dir,
                                                                                       sst2_teacher_dir, tmp_path):
    from transformers import TrainerState

    from cap.tracking import TrainingLog

    run(composed(tiny_overrides(tiny_model_dir, "sst2") + [
        "method=cap_soft", f"teacher.path={sst2_teacher_dir}", "trainer.max_steps=-1", "trainer.epochs=2",
        "trainer.warmup=1", "prune.initial_warmup=0", "prune.final_warmup=1"]), tmp_path)
    path = tmp_path / "trainer_log.jsonl"
    log = [json.loads(line) for line in path.read_text().splitlines()]
    training = [r for r in log if "loss" in r]
    assert [r["update"] for r in training] == [1, 2, 3, 4]  # logging_steps=1
    for key in ("loss_ce", "loss_kd", "loss_reg", "prune_level", "prune_lambda", "sparsity_entries", "learning_rate"):
        assert all(key in r for r in training), key
    balanced = [r for r in training if "grad_cosine" in r]  # the scores and the weights apart, from the same grads
    assert balanced and all(r["grad_norm_task_scores"] > 0 and r["grad_norm_contrast_weights"] > 0 for r in balanced)
    assert all(r["grad_norm_task"] ** 2 == pytest.approx(r["grad_norm_task_scores"] ** 2 + r["grad_norm_task_weights"]
                                                          ** 2, rel=1e-4) for r in balanced)
    assert [r["update"] for r in log if "validation/accuracy" in r] == [2, 4]  # every epoch evaluated

    # a Trainer resumed from update 2 drops what the killed attempt logged after it
    state = TrainerState()
    state.global_step, state.is_world_process_zero = 2, True
    TrainingLog(path).on_train_begin(None, state, None)
    assert max(json.loads(line)["update"] for line in path.read_text().splitlines()) == 2




@pytest.mark.parametrize("overrides, expected", [
    (["experiment=paper/cap_m/qqp_90"],
     ["task:qqp", "method:cap_m", "sparsity:0.9", "ablation:full", "seed:42"]),
    (["experiment=paper/cap_m/mnli_97", "seed=3"],
     ["task:mnli", "method:cap_m", "sparsity:0.97", "ablation:full", "seed:3"]),
    (["experiment=paper/cap_f/sst2", "prune.sequence=[0.3,0.6]"],
     ["task:sst2", "method:cap_f", "sparsity:0.6", "ablation:full", "seed:42"]),
    (["experiment=paper/cap_soft/qqp_97"],
     ["task:qqp", "method:cap_soft", "tau:0.1", "lambda:550", "ablation:full", "seed:42"]),
    (["experiment=paper/cap_soft/squad_50"],
     ["task:squad", "method:cap_soft", "sparsity:0.5", "ablation:full", "seed:42"]),
    (["task=rte"], ["task:rte", "method:finetune", "sparsity:0", "seed:42"]),
])
def test_run_tags_name_task_method_sparsity_ablation_seed(overrides, expected):
    assert run_tags(composed(overrides)) == expected


@pytest.mark.parametrize("overrides, ablation", [
    (["contrast.enabled=false"], ["baseline"]),
    (["contrast.enabled=false", "kd.weight=0"], ["baseline", "-KD"]),
    (["contrast.prc=false"], ["-PrC"]),
    (["contrast.snc=false", "contrast.fic=false"], ["-SnC", "-FiC"]),
    (["contrast.sup_weight=0"], ["-sup"]),
    (["contrast.unsup_weight=0.0"], ["-unsup"]),
    (["kd.weight=0"], ["-KD"]),
    (["contrast.pooling=mean"], ["pool=mean"]),
    (["contrast.normalization=per_anchor"], ["norm=per_anchor"]),
    (["task=squad", "contrast.sup_weight=0"], ["full"]),  # no supervised term on SQuAD anyway
])
def test_ablation_tags(overrides, ablation):
    tags = run_tags(composed(["method=cap_m", *overrides]))
    assert [t.split(":", 1)[1] for t in tags if t.startswith("ablation:")] == ablation


def test_user_tags_are_kept_before_the_computed_ones(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    seen = {}
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs))
    from cap import tracking

    settings = tracking.TrackingSettings.from_config(composed(["method=cap_m", "logger=wandb",
                                                               "logger.tags=[mine,seed:42]"]))
    tracking.start(settings, tmp_path)
    assert seen["tags"] == ["mine", "seed:42", "task:sst2", "method:cap_m", "sparsity:0.9", "ablation:full"]
    assert seen["group"] is None


def test_group_is_the_sweep_dir_in_a_multirun_unless_given():
    hydra_cfg = OmegaConf.create({"mode": RunMode.MULTIRUN, "sweep": {"dir": "multiruns/qqp-ablations"}})
    single = OmegaConf.create({"mode": RunMode.RUN, "sweep": {"dir": "multiruns/2024-01-01_00-00-00"}})
    assert run_group(composed(["logger=wandb"]), hydra_cfg) == "qqp-ablations"
    assert run_group(composed(["logger=wandb", "logger.group=mine"]), hydra_cfg) == "mine"
    assert run_group(composed(["logger=wandb"]), single) is None
    assert run_group(composed(["logger=wandb"])) is None
