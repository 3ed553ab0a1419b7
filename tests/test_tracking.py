"""logger=wandb on a tiny job, offline: the metrics are read back from the run's own .wandb file."""
import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

from helpers import composed, tiny_overrides

from cap.recipes import run

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


def test_wandb_offline_logs_config_terms_and_metrics(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = composed(tiny_overrides(tiny_model_dir, "mrpc") + ["logger=wandb", "logger.group=g1", "logger.tags=[x]"])
    rows = run(cfg, tmp_path)
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history, summary, config = [], {}, {}
    for record in read_wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            assert record.run.run_group == "g1" and list(record.run.tags) == ["x"]
    assert config["task"]["name"] == "mrpc" and config["trainer"]["max_steps"] == 2
    train_logs = [h for h in history if "train/loss" in h]
    assert train_logs and all("train/loss_ce" in h for h in train_logs)
    assert summary["validation/f1"] == rows[0]["f1"]
    assert summary["validation/accuracy"] == rows[0]["accuracy"]
