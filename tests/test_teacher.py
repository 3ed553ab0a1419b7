"""teacher.cache_outputs: the frozen teacher runs once over the training set; its looked-up logits give the KD loss
that running it in every update gives (GLUE and SQuAD), and a resumed run loads them instead of running it again."""
import pytest
import torch

from helpers import composed, tiny_overrides

from cap.methods import training_arguments
from cap.recipes.common import prepare, pruning_trainer
from cap.teacher import LOGITS_FILE, TeacherPassSettings, teacher_pass


def _setup(overrides, teacher_path):
    cfg = composed([*overrides, f"teacher.path={teacher_path}", "trainer.precision=fp32", "kd.weight=0.9",
                    "contrast.enabled=false"])
    return cfg, prepare(cfg)


def _kd_per_batch(cfg, setup, tmp_path, outputs):
    trainer = pruning_trainer(cfg, setup, training_arguments(cfg, tmp_path / "out", []), {}, teacher_outputs=outputs)
    trainer.model.eval()  # no dropout: the same student logits in both passes
    kd = []
    with torch.no_grad():
        for batch in trainer.get_train_dataloader():
            terms, _ = trainer.loss_terms(trainer.model, trainer._prepare_inputs(batch), contrast=False)
            kd.append(terms["kd"])
    return torch.stack(kd)


@pytest.fixture(scope="module")
def squad_teacher_dir(tmp_path_factory, tiny_model_dir):
    """An (untrained) QA model as the teacher: the cache must give what its forward gives, whatever it learned."""
    from cap.data import get_task
    from cap.models import build_model

    out = tmp_path_factory.mktemp("qa-teacher")
    torch.manual_seed(1)
    build_model(str(tiny_model_dir), get_task("squad")).save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sst2", "squad"])
def test_the_cached_teacher_gives_the_kd_loss_of_running_it(task, tiny_model_dir, sst2_teacher_dir,
                                                           squad_teacher_dir, data_dir, tmp_path):
    teacher = sst2_teacher_dir if task == "sst2" else squad_teacher_dir
    cfg, setup = _setup([*tiny_overrides(tiny_model_dir, task), "data.group_by_length=true"], teacher)
    outputs = teacher_pass(TeacherPassSettings.from_config(cfg), setup, {}, tmp_path / "banks", torch.device("cpu"))
    assert outputs is not None and (tmp_path / "banks" / LOGITS_FILE).exists()
    n = len(setup.data.train)
    if task == "squad":
        assert outputs.logits["start_logits"].shape == (n, cfg.data.max_seq_length)
    cached = _kd_per_batch(cfg, setup, tmp_path, outputs)
    recomputed = _kd_per_batch(cfg, setup, tmp_path, None)
    assert cached.shape == recomputed.shape and recomputed.abs().sum() > 0
    assert torch.allclose(cached, recomputed, atol=1e-5, rtol=1e-4)


def test_the_teacher_pass_fills_fic_and_a_resumed_run_loads_both(tiny_model_dir, sst2_teacher_dir, data_dir,
                                                                 tmp_path, capsys):
    from cap.banks import BankSettings, build_banks, encode_vectors

    cfg, setup = _setup(tiny_overrides(tiny_model_dir, "sst2"), sst2_teacher_dir)
    cfg.contrast.enabled = True
    settings = TeacherPassSettings.from_config(cfg)

    def fresh_banks():
        return build_banks(BankSettings.from_config(cfg), setup.data, setup.model.config.hidden_size, 1)

    banks = fresh_banks()
    first = teacher_pass(settings, setup, banks, tmp_path, torch.device("cpu"))
    fic = encode_vectors(setup.teacher, setup.data.train, setup.collator, pooling=cfg.contrast.pooling)
    assert torch.allclose(banks["fic"].view()[:, 0].float(), fic, atol=1e-3)  # the bank stores float16
    again = fresh_banks()
    second = teacher_pass(settings, setup, again, tmp_path, torch.device("cpu"))
    assert "loaded from" in capsys.readouterr().out
    assert torch.equal(first.logits["logits"], second.logits["logits"])
    assert torch.equal(banks["fic"].view(), again["fic"].view())
    (tmp_path / LOGITS_FILE).write_bytes(b"damaged")  # a damaged file is not used: the pass runs again
    third = teacher_pass(settings, setup, fresh_banks(), tmp_path, torch.device("cpu"))
    assert torch.equal(first.logits["logits"], third.logits["logits"])


def test_without_the_cache_or_kd_nothing_is_cached(tiny_model_dir, sst2_teacher_dir, data_dir, tmp_path):
    cfg, setup = _setup(tiny_overrides(tiny_model_dir, "sst2"), sst2_teacher_dir)
    cfg.teacher.cache_outputs = False
    assert teacher_pass(TeacherPassSettings.from_config(cfg), setup, {}, tmp_path, torch.device("cpu")) is None
    cfg.teacher.cache_outputs, cfg.kd.weight = True, 0.0
    assert teacher_pass(TeacherPassSettings.from_config(cfg), setup, {}, tmp_path, torch.device("cpu")) is None
    assert not (tmp_path / LOGITS_FILE).exists()
