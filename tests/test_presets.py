"""Every preset in conf/experiment/ composes, the paper presets carry the spec §8 settings, the launchers compose."""
import pytest
from hydra import compose, initialize_config_dir

from helpers import REPO, composed

EXPERIMENTS = REPO / "conf" / "experiment"
PRESETS = sorted(p.relative_to(EXPERIMENTS).with_suffix("").as_posix() for p in EXPERIMENTS.rglob("*.yaml"))
PAPER = [name for name in PRESETS if name.startswith("paper/")]
MOVEMENT = [name for name in PAPER if name.split("/")[1] in ("cap_m", "cap_soft")]


def test_the_paper_grid_is_complete():
    expected = {f"paper/cap_f/{task}" for task in ("sst2", "qqp", "mnli", "squad")}
    expected |= {f"paper/{method}/{task}_{pct}" for method in ("cap_m", "cap_soft")
                 for task in ("qqp", "mnli", "squad") for pct in (50, 90, 97)}
    assert set(PAPER) == expected


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes(name):
    cfg = composed([f"experiment={name}"])
    assert cfg.method.name in ("finetune", "cap_f", "cap_m", "cap_soft")


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_use_bert_base_and_the_scripts_shared_settings(name):
    cfg = composed([f"experiment={name}"])
    task = name.split("/")[2].split("_")[0]
    assert cfg.task.name == task and cfg.model.name_or_path == "bert-base-uncased"
    assert (cfg.ce.weight, cfg.kd.weight, cfg.contrast.extra_examples, cfg.seed) == (0.1, 0.9, 4096, 42)
    assert cfg.contrast.enabled and cfg.contrast.prc and cfg.contrast.snc and cfg.contrast.fic
    assert cfg.data.max_train_samples is None and cfg.trainer.max_steps == -1


def test_paper_cap_m_qqp_90():
    cfg = composed(["experiment=paper/cap_m/qqp_90"])
    assert cfg.prune.final == 0.1 and cfg.prune.criterion == "topk"
    assert cfg.kd.temperature == 2.0 and cfg.contrast.temperature == 0.1
    assert (cfg.contrast.unsup_weight, cfg.contrast.sup_weight) == (0.1, 10.0)
    assert (cfg.trainer.batch_size, cfg.trainer.lr, cfg.trainer.weight_decay) == (32, 3e-5, 0.0)
    schedule = (cfg.trainer.epochs, cfg.trainer.warmup, cfg.prune.initial_warmup, cfg.prune.final_warmup)
    assert schedule == (10, 11000, 2, 3)
    assert cfg.prune.score_lr == 1e-2


@pytest.mark.parametrize("pct, keep", [(50, 0.5), (90, 0.1), (97, 0.03)])
@pytest.mark.parametrize("task", ["qqp", "mnli", "squad"])
def test_cap_m_keep_fractions(task, pct, keep):
    assert composed([f"experiment=paper/cap_m/{task}_{pct}"]).prune.final == keep


@pytest.mark.parametrize("name, final_lambda", [
    ("qqp_90", 190), ("qqp_97", 550), ("mnli_90", 290), ("mnli_97", 680), ("squad_90", 600), ("squad_97", 2000),
])
def test_cap_soft_lambdas_from_the_original_readme(name, final_lambda):
    cfg = composed([f"experiment=paper/cap_soft/{name}"])
    assert cfg.prune.final_lambda == final_lambda and cfg.prune.target_sparsity is None
    assert (cfg.prune.criterion, cfg.prune.initial, cfg.prune.final) == ("soft", 0.0, 0.1)


@pytest.mark.parametrize("task", ["qqp", "mnli", "squad"])
def test_cap_soft_50_steers_to_the_target(task):
    assert composed([f"experiment=paper/cap_soft/{task}_50"]).prune.target_sparsity == 0.5


@pytest.mark.parametrize("name", [n for n in MOVEMENT if "squad" in n])
def test_squad_movement_settings(name):
    cfg = composed([f"experiment={name}"])
    schedule = (cfg.trainer.batch_size, cfg.trainer.warmup, cfg.prune.initial_warmup, cfg.prune.final_warmup)
    assert schedule == (16, 5400, 1, 2)
    assert cfg.contrast.unsup_weight == 0.5 and cfg.contrast.temperature == 0.1
    assert cfg.data.max_seq_length == 384 and cfg.data.doc_stride == 128 and cfg.data.max_query_length == 64


def test_cap_f_glue_and_squad():
    sst2, squad = composed(["experiment=paper/cap_f/sst2"]), composed(["experiment=paper/cap_f/squad"])
    assert list(sst2.prune.sequence) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9] and sst2.prune.retrain_epochs == 2
    assert (sst2.trainer.lr, sst2.contrast.temperature, sst2.kd.temperature) == (2e-5, 0.1, 1.0)
    assert (sst2.contrast.unsup_weight, sst2.contrast.sup_weight, sst2.trainer.batch_size) == (0.3, 3.0, 16)
    assert (squad.trainer.lr, squad.contrast.temperature, squad.contrast.unsup_weight) == (3e-5, 0.3, 0.3)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("minilm/")])
def test_minilm_twins_are_cpu_scale(name):
    cfg = composed([f"experiment={name}"])
    assert cfg.model.name_or_path == "minilm" and cfg.task.name == "sst2"
    assert 0 < cfg.data.max_train_samples <= 5000
    if cfg.method.name in ("cap_m", "cap_soft"):
        assert cfg.trainer.warmup < 1  # a fraction, so that the threshold schedule fits the short run


@pytest.mark.parametrize("launcher, plugin", [("cap_joblib", "hydra_plugins.hydra_joblib_launcher"),
                                              ("cap_slurm", "hydra_plugins.hydra_submitit_launcher")])
def test_launchers_compose(launcher, plugin, monkeypatch):
    pytest.importorskip(plugin)
    monkeypatch.setenv("CAP_JOBS", "3")
    monkeypatch.setenv("SBATCH_PARTITION", "gpu")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    settings = cfg.hydra.launcher
    if launcher == "cap_joblib":
        assert settings.n_jobs == 3 and settings._target_.endswith("JoblibLauncher")
    else:
        assert settings.partition == "gpu" and settings.gpus_per_node == 1 and settings.max_num_timeout > 0
        assert settings._target_.endswith("SlurmLauncher")
