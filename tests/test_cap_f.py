"""CAP-f end to end on a tiny model and a slice of SST-2: stages, banks, metrics per sparsity, resume."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import cap_f_overrides, composed, tiny_overrides

from cap.errors import UserError
from cap.recipes import run


def test_cap_f_three_steps(tiny_model_dir, sst2_teacher_dir, tmp_path):
    rows = run(composed(cap_f_overrides(tiny_model_dir, sst2_teacher_dir)), tmp_path)
    assert [r["sparsity"] for r in rows] == [0.25, 0.5, 0.75]
    # 2 layers x 4 heads, 2 x 64 neurons: int(8 p) heads and int(128 p) neurons masked after each step
    assert [r["sparsity_heads"] for r in rows] == [2 / 8, 4 / 8, 6 / 8]
    assert [r["sparsity_ffn_neurons"] for r in rows] == [32 / 128, 64 / 128, 96 / 128]
    assert all("accuracy" in r and r["split"] == "validation" for r in rows)
    masks = load_file(str(tmp_path / "stages" / "0.75" / "masks.safetensors"))
    assert (masks["head_mask"].sum(1) >= 1).all()  # never a layer without heads
    snc = load_file(str(tmp_path / "stages" / "0.75" / "selected" / "snc.safetensors"))
    assert snc["vectors"].shape[:2] == (16, 2)  # snapshots after 25 % and 50 %: the current level is never in SnC
    prc = load_file(str(tmp_path / "stages" / "0.25" / "selected" / "prc.safetensors"))["vectors"]
    assert torch.equal(prc, load_file(str(tmp_path / "stages" / "0.75" / "selected" / "prc.safetensors"))["vectors"])
    for stage in ("0.25", "0.5", "0.75"):
        check_folded_stage(tmp_path / "stages" / stage)
    # the importance each selection was made by is kept beside it: the new neurons are the least important
    before = load_file(str(tmp_path / "stages" / "0.25" / "masks.safetensors"))["ffn_mask"].bool()
    after = load_file(str(tmp_path / "stages" / "0.5" / "masks.safetensors"))["ffn_mask"].bool()
    importance = load_file(str(tmp_path / "stages" / "0.5" / "selected" / "importance.safetensors"))
    assert importance["head_importance"].shape == (2, 4) and importance["ffn_importance"].shape == (2, 64)
    new = before & ~after
    assert int(new.sum()) == 32 and importance["ffn_importance"][new].max() <= importance["ffn_importance"][after].min()
    # finished stages keep no Trainer checkpoints; the run's model/ is the last stage's, sharing its files
    assert not list(tmp_path.glob("stages/*/checkpoints")) and not list(tmp_path.glob("stages/*/.checkpoints*"))
    last = tmp_path / "stages" / "0.75" / "model"
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted(p.name for p in last.iterdir())
    assert all(os.path.samefile(p, last / p.name) for p in (tmp_path / "model").iterdir())


def check_folded_stage(stage):
    """`from_pretrained` on a stage's model gives the masked model's logits: the live model at the stage's end
    (the folded model with its zeroed rows put back) with the mask hooks."""
    from transformers import AutoModelForSequenceClassification

    from cap.pruning import StructuredMasks

    folded = AutoModelForSequenceClassification.from_pretrained(stage / "model").eval()
    masked = AutoModelForSequenceClassification.from_pretrained(stage / "model").eval()
    masks = StructuredMasks(**load_file(str(stage / "masks.safetensors")))
    zeroed = load_file(str(stage / "masked_weights.safetensors"))
    assert any(t.abs().sum() > 0 for t in zeroed.values())  # the live model's masked rows are not 0
    masks.unfold(masked, zeroed)
    masks.apply(masked)
    ids = torch.randint(1000, 2000, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (folded(input_ids=ids).logits - masked(input_ids=ids).logits).abs().max() <= 1e-6


@pytest.mark.slow
def test_cap_f_resumes_a_killed_stage(tiny_model_dir, sst2_teacher_dir, tmp_path):
    full = run(composed(cap_f_overrides(tiny_model_dir, sst2_teacher_dir)), tmp_path / "full")
    run_dir = tmp_path / "killed"
    run(composed(cap_f_overrides(tiny_model_dir, sst2_teacher_dir)), run_dir)
    # as if killed during the last step's retraining: its selection is saved, its results are not
    last = run_dir / "stages" / "0.75"
    for name in ("DONE", "masks.safetensors"):
        (last / name).unlink()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps(metrics[:-1]))
    resumed = run(composed(cap_f_overrides(tiny_model_dir, sst2_teacher_dir)), run_dir)
    assert [r["sparsity"] for r in resumed] == [0.25, 0.5, 0.75]
    assert torch.equal(load_file(str(last / "masks.safetensors"))["head_mask"],
                       load_file(str(tmp_path / "full" / "stages" / "0.75" / "masks.safetensors"))["head_mask"])
    assert resumed[-1]["sparsity_heads"] == full[-1]["sparsity_heads"]


@pytest.mark.parametrize("sequence", ["[0.5,0.3]", "[0.2,1.0]", "[-0.1]"])
def test_impossible_sequences_are_refused(tiny_model_dir, sst2_teacher_dir, tmp_path, sequence):
    with pytest.raises(UserError, match="prune.sequence"):
        run(composed(cap_f_overrides(tiny_model_dir, sst2_teacher_dir, f"prune.sequence={sequence}")), tmp_path)
    assert not list(tmp_path.iterdir())


def test_plain_pruning_baseline_builds_no_bank(tiny_model_dir, sst2_teacher_dir, tmp_path):
    rows = run(composed(cap_f_overrides(tiny_model_dir, sst2_teacher_dir, "contrast.enabled=false",
                                        "prune.sequence=[0.5]")), tmp_path)
    assert rows[0]["sparsity_heads"] == 0.5
    # no bank: only the teacher's cached logits (KD is on) are kept there
    assert [p.name for p in (tmp_path / "banks").iterdir()] == ["teacher_logits.safetensors"]


def test_without_teacher_path_a_teacher_is_fine_tuned_once_and_cached(tiny_model_dir, tmp_path, capsys):
    overrides = [*tiny_overrides(tiny_model_dir, "sst2"), "method=cap_f", "prune.sequence=[0.5]",
                 "contrast.extra_examples=8", f"teacher.cache_dir={tmp_path / 'teachers'}"]
    run(composed(overrides), tmp_path / "a")
    assert "fine-tuning a teacher" in capsys.readouterr().out
    (teacher,) = [p for p in (tmp_path / "teachers").iterdir() if not p.name.startswith(".")]  # .<name>.lock
    assert (teacher / "model" / "config.json").exists()
    assert sorted(p.name for p in teacher.iterdir()) == ["metrics.json", "model", "trainer_log.jsonl"]  # no checkpoint
    run(composed(overrides), tmp_path / "b")
    assert "fine-tuning a teacher" not in capsys.readouterr().out


def test_keep_checkpoints_keeps_them_and_a_finished_run_says_so(tiny_model_dir, tmp_path, capsys):
    overrides = [*tiny_overrides(tiny_model_dir, "sst2"), "method=cap_f", "prune.sequence=[0.5]",
                 "contrast.extra_examples=8", f"teacher.cache_dir={tmp_path / 'teachers'}",
                 "trainer.keep_checkpoints=true"]
    rows = run(composed(overrides), tmp_path / "run")
    (teacher,) = [p for p in (tmp_path / "teachers").iterdir() if not p.name.startswith(".")]  # .<name>.lock
    for folder in (teacher, tmp_path / "run" / "stages" / "0.5"):
        assert list(folder.glob("checkpoints/checkpoint-*/optimizer.pt"))
    assert "already finished" not in capsys.readouterr().out
    shutil.rmtree(tmp_path / "run" / "model")  # as a kill before it was published leaves the run
    assert run(composed(overrides), tmp_path / "run") == rows
    assert capsys.readouterr().out.count(f"already finished: {tmp_path / 'run'}") == 1
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_cap_f_stage_exports_to_a_smaller_model_with_the_same_logits(tiny_model_dir, sst2_teacher_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from cap.export import load_pruned, main
    from cap.pruning import StructuredMasks

    import yaml
    from omegaconf import OmegaConf

    cfg = composed(cap_f_overrides(tiny_model_dir, sst2_teacher_dir, "prune.sequence=[0.5]"))
    rows = run(cfg, tmp_path)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")  # as `python -m cap` leaves it
    stage = tmp_path / "stages" / "0.5"
    masked = AutoModelForSequenceClassification.from_pretrained(stage / "model").eval()
    StructuredMasks(**load_file(str(stage / "masks.safetensors"))).apply(masked)
    out = main([str(tmp_path), "--stage", "0.5", "--onnx", "--quantize", "int8"])
    small = load_pruned(out)
    ids = torch.randint(1000, 2000, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (small(input_ids=ids).logits - masked(input_ids=ids).logits).abs().max() <= 1e-4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in masked.parameters())
    assert (out / "model.onnx").is_file() and (out / "model.int8.onnx").is_file()

    # model cards: the stage's model (and so the run's final model/) and the export
    for folder, loads in ((tmp_path / "model", "from_pretrained("), (out, "trust_remote_code=True")):
        card = (folder / "README.md").read_text()
        front = yaml.safe_load(card.split("---")[1])
        assert front["pipeline_tag"] == "text-classification" and front["datasets"] == ["glue"]
        (result,) = front["model-index"][0]["results"]
        assert result["metrics"] == [{"type": "accuracy", "value": round(rows[0]["accuracy"], 6)}]
        assert f"`sparsity_heads`: {rows[0]['sparsity_heads']}" in card and loads in card
    assert "onnxruntime.InferenceSession" in (out / "README.md").read_text()

    # each deploy format scored on the dev set: ONNX fp32 predicts what the PyTorch export does
    from cap.evaluate import evaluate

    scored = {name: evaluate(out / name if name else out)[0] for name in ("", "model.onnx", "model.int8.onnx")}
    assert scored["model.onnx"]["accuracy"] == scored[""]["accuracy"] == rows[0]["accuracy"]
    assert scored["model.onnx"]["kind"] == "onnx" and 0 <= scored["model.int8.onnx"]["accuracy"] <= 1
    assert scored["model.onnx"]["sparsity_heads"] == scored[""]["sparsity_heads"] == 0.5
    assert (out / "eval-model.int8" / "metrics.json").is_file()


@pytest.mark.slow
def test_settings_can_be_chosen_on_a_split_carved_from_the_training_set(tiny_model_dir, tmp_path):
    """data.validation_from_train + data.eval_split=trainval: the teacher (fine-tuned here) and the pruned model are
    evaluated on held-out training rows only."""
    rows = run(composed([*tiny_overrides(tiny_model_dir, "sst2"), "method=cap_f", "prune.sequence=[0.5]",
                         f"teacher.cache_dir={tmp_path / 'teachers'}", "data.validation_from_train=40",
                         "data.eval_split=trainval"]), tmp_path / "run")
    assert [r["split"] for r in rows] == ["trainval"] and "accuracy" in rows[0]
    (teacher,) = [p for p in (tmp_path / "teachers").iterdir() if not p.name.startswith(".")]  # .<name>.lock
    assert [r["split"] for r in json.loads((teacher / "metrics.json").read_text())] == ["trainval"]
