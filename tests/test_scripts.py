"""scripts/oneshot_masks.py on the tiny SST-2 teacher: what its masks keep (read back from its JSON), and the
movement scores it learns."""
import argparse
import importlib.util
import json

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from cap.data import load_task_data
from cap.pruning.movement import PRUNED_MODULES, prunable_linears

from helpers import REPO


def oneshot_masks():
    spec = importlib.util.spec_from_file_location("oneshot_masks", REPO / "scripts" / "oneshot_masks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_oneshot_masks_zero_what_they_say(sst2_teacher_dir, data_dir, tmp_path):
    script = oneshot_masks()
    out = tmp_path / "oneshot.json"
    script.main([str(sst2_teacher_dir), "--task", "sst2", "--data-dir", str(data_dir), "--keep", "1.0", "0.5", "0.0",
                 "--movement-updates", "2", "--max-train-samples", "16", "--batch-size", "8",
                 "--probe-sentences", "8", "--group-keep", "0.5", "--out", str(out)])
    written = json.loads(out.read_text())["rows"]
    groups = [r for r in written if "only" in r]
    written = [r for r in written if "only" not in r]
    rows = {(r["criterion"], r["keep"]): r["validation"]["accuracy"] for r in written}
    criteria = ("magnitude", "random", "movement", "movement_flipped", "movement_extremes")
    assert set(rows) == {("dense", 1.0), *((c, k) for c in criteria for k in (1.0, 0.5, 0.0))}
    # the masks zero what they say (the tiny model's weights have no exact zeros of their own)
    for r in written[1:]:
        assert abs(r["matrix_sparsity"] - (1 - r["keep"])) < 1e-3, r
    # keeping everything is the dense model, whatever chooses the mask
    assert {rows[(c, 1.0)] for c in criteria} == {rows[("dense", 1.0)]}
    # keeping nothing zeroes every encoder matrix: every criterion gives the same model
    assert len({rows[(c, 0.0)] for c in criteria}) == 1
    # the output change is 0 when everything is kept, 1 when nothing is; removing half by |W| changes less than
    # removing half at random (above 1 only where the removed contributions add up: movement's one-signed tails)
    change = {(r["criterion"], r["keep"]): r["output_change"] for r in written[1:]}
    assert all(change[(c, 1.0)] == 0 and abs(change[(c, 0.0)] - 1) < 1e-6 for c in criteria)
    assert 0 < change[("magnitude", 0.5)] < change[("random", 0.5)] < 1
    # one group at a time (--group-keep 0.5): the six kinds, then the layers, each partitioning the masked entries
    kinds, layers = groups[:6], groups[6:]
    assert [r["only"] for r in kinds] == list(PRUNED_MODULES)
    assert [r["only"] for r in layers] == [f"layer.{i}" for i in range(len(layers))] and len(layers) > 1
    for part in (kinds, layers):
        assert abs(sum(r["matrix_sparsity"] for r in part) - 0.5) < 1e-3


def test_movement_scores_are_learned_per_matrix(sst2_teacher_dir, data_dir):
    script = oneshot_masks()
    tokenizer = AutoTokenizer.from_pretrained(sst2_teacher_dir)
    train = load_task_data("sst2", tokenizer, data_dir=data_dir, max_train_samples=16).train
    args = argparse.Namespace(movement_updates=3, score_lr=0.1, lr=3e-5, batch_size=8, seed=0)
    first, again = (script.movement_scores(sst2_teacher_dir, train, DataCollatorWithPadding(tokenizer), args)
                    for _ in range(2))
    model = AutoModelForSequenceClassification.from_pretrained(sst2_teacher_dir)
    assert {n: tuple(s.shape) for n, s in first.items()} == {n: tuple(m.weight.shape)
                                                              for n, m in prunable_linears(model)}
    # Adam moves a score that sees a gradient by about lr per update: three at lr 0.1 stay well under 0.45;
    # the same seed, the same scores
    moved = torch.cat([s.flatten() for s in first.values()])
    assert 0 < moved.abs().max() <= 0.45 and (moved != 0).float().mean() > 0.5
    assert all(torch.equal(first[n], again[n]) for n in first)
