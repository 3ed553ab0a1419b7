"""SQuAD v1.1 through every method on a tiny QA model: teacher, CAP-f, CAP-m, CAP-soft, and their exports."""
import json

import pytest
import torch

from helpers import composed, tiny_overrides

from cap.export import load_pruned, main as export_main
from cap.recipes import run
from cap.sparse import load_sparse


@pytest.fixture(scope="module")
def squad_teacher_dir(tmp_path_factory, tiny_model_dir, data_dir):
    out = tmp_path_factory.mktemp("squad-teacher")
    rows = run(composed([*tiny_overrides(tiny_model_dir, "squad"), "method=finetune"]), out)
    assert {"exact_match", "f1"} <= set(rows[0])
    return out / "model"


def squad_overrides(model_dir, teacher_dir, method, *extra):
    return [*tiny_overrides(model_dir, "squad"), f"method={method}", f"teacher.path={teacher_dir}",
            "contrast.extra_examples=8", *extra]


def check_rows(rows, predictions_dir):
    assert rows and all({"exact_match", "f1"} <= set(r) and 0 <= r["f1"] <= 100 for r in rows)
    predictions = json.loads((predictions_dir / "predictions.json").read_text())["validation"]
    assert len(predictions) > 0 and all(isinstance(v, str) for v in predictions.values())


def test_method_settings_for_squad():
    cap_f = composed(["task=squad", "method=cap_f"])
    assert cap_f.contrast.temperature == 0.3 and cap_f.trainer.lr == 3e-5
    cap_m = composed(["task=squad", "method=cap_m"])
    assert (cap_m.contrast.unsup_weight, cap_m.trainer.warmup, cap_m.prune.final_warmup) == (0.5, 5400, 2)
    assert composed(["task=squad", "method=cap_soft"]).prune.final_lambda == 600
    assert composed(["task=squad", "method=cap_f", "contrast.temperature=0.5"]).contrast.temperature == 0.5
    assert composed(["task=sst2", "method=cap_f"]).contrast.temperature == 0.1


@pytest.mark.slow
def test_cap_f_on_squad_and_its_export(tiny_model_dir, squad_teacher_dir, tmp_path):
    rows = run(composed(squad_overrides(tiny_model_dir, squad_teacher_dir, "cap_f", "prune.sequence=[0.25,0.5]")),
               tmp_path)
    check_rows(rows, tmp_path / "stages" / "0.5")  # CAP-f keeps each stage's answers
    assert [r["sparsity"] for r in rows] == [0.25, 0.5]
    model = load_pruned(export_main([str(tmp_path), "--stage", "0.5"]))
    assert type(model).__name__ == "PrunedBertForQuestionAnswering"
    ids = torch.randint(5, 1000, (2, 16))
    assert model(input_ids=ids).start_logits.shape == (2, 16)


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("cap_m", ["prune.final=0.5"]),
                                          ("cap_soft", ["prune.final_lambda=50", "prune.score_lr=0.5"])])
def test_movement_on_squad_and_its_sparse_export(tiny_model_dir, squad_teacher_dir, tmp_path, method, extra):
    overrides = squad_overrides(tiny_model_dir, squad_teacher_dir, method, "trainer.max_steps=-1",
                                "trainer.epochs=2", "trainer.warmup=1", "prune.initial_warmup=0",
                                "prune.final_warmup=1", "trainer.batch_size=8", *extra)
    rows = run(composed(overrides), tmp_path)
    check_rows(rows, tmp_path)
    assert [r["stage"] for r in rows] == [1, 2]
    if method == "cap_m":
        assert rows[-1]["sparsity_entries"] == pytest.approx(0.5, abs=0.01)
    model = load_sparse(tmp_path / "sparse")
    assert type(model).__name__ == "BertForQuestionAnswering"
    assert (tmp_path / "banks" / "snc.safetensors").exists()  # the snapshot bank of epoch 1
