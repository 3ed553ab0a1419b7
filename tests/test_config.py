"""The config schema (cap/config.py): bad types and unknown keys are refused while composing, in one line and
before a run dir exists; `--help` lists every key with its type and doc; run-dir names are shell-safe."""
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
import typing

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from cap.checks import validate
from cap.cli import check, explain
from cap.config import SCHEMAS, VARIANTS, CAPConfig, CapFPrune, MovementPrune, dirname, key_docs
from cap.errors import UserError
from cap.recipes.finetune import teacher_run

from helpers import REPO, composed

EXPERIMENTS = REPO / "conf" / "experiment"
PRESETS = sorted(p.relative_to(EXPERIMENTS).with_suffix("").as_posix() for p in EXPERIMENTS.rglob("*.yaml"))
PRUNE_SCHEMA = {"finetune": None, "cap_f": CapFPrune, "cap_m": MovementPrune, "cap_soft": MovementPrune}


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    env.pop("CAP_DATA_DIR", None)  # a run that got past composition would fail on the (offline) hub, not train
    return subprocess.run([sys.executable, "-m", "cap", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def leaf_docs(schema) -> dict[str, tuple[str, str]]:
    """key_docs without the fields that are nodes of their own (CAPConfig.trainer, ...)."""
    hints = typing.get_type_hints(schema)
    return {k: v for k, v in key_docs(schema).items() if not dataclasses.is_dataclass(hints[k])}


def refused(*overrides) -> str:
    """explain() of the composition error of `overrides` (the line `python -m cap` prints after `error: `)."""
    with pytest.raises(CompactHydraException) as err:
        composed(list(overrides))
    return explain(err.value)


# ------------------------------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("args,line", [
    (["trainer.lr=abc"], "error: trainer.lr=abc: expected a number (the learning rate (AdamW, linear decay to 0))"),
    (["+trainer.lrr=1"], "error: trainer.lrr: no such key; did you mean trainer.lr?"),
    (["trainer.lrr=1"], "error: trainer.lrr: no such key; did you mean trainer.lr?"),
    (["trainer.batch_size=1.5"], "error: trainer.batch_size=1.5: expected an integer (training examples per update "
                                 "over all processes (the global batch))"),
    (["method=cap_f", "prune.sequence=abc"], "error: prune.sequence=abc: expected a list of numbers such as [0.3,0.6] "
                                             "(cumulative fraction of heads and of FFN neurons pruned after each step, "
                                             "increasing)"),
    (["-m", "trainer.lr=1e-5,abc"], "error: trainer.lr=abc: expected a number (the learning rate (AdamW, linear "
                                    "decay to 0))"),
], ids=["bad-type", "unknown-key-added", "unknown-key", "int-as-float", "cap_f-sequence", "sweep"])
def test_bad_keys_and_values_fail_while_composing(tmp_path, args, line):
    start = time.time()
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines() == [line]
    assert time.time() - start < 60  # composition only: no model, no data
    assert not list(tmp_path.iterdir())  # no runs/, outputs/ or multiruns/


def test_help_lists_every_key_with_its_type_and_doc(tmp_path):
    out = cli("method=cap_f", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "method: cap_f, cap_m, cap_soft, finetune" in lines  # the groups, as Hydra lists them
    (lr,) = [line for line in lines if line.startswith("trainer.lr=")]
    assert lr.split() == ["trainer.lr=2e-05", "float", "the", "learning", "rate", "(AdamW,", "linear", "decay", "to",
                          "0)"]
    assert any(line.startswith("prune.sequence=[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9]") for line in lines)
    assert any(line.startswith("prune.final_lambda ") and "[method=cap_m or cap_soft]" in line for line in lines)
    for schema in SCHEMAS.values():  # every key of every schema, with its doc (prune and logger: their keys')
        for key, (kind, doc) in leaf_docs(schema).items():
            if schema is CAPConfig and key in VARIANTS:
                continue
            assert any(f"{kind}  " in line and doc in line for line in lines), (schema.__name__, key)
    assert not list(tmp_path.iterdir())


def test_every_key_has_a_type_and_a_one_line_doc():
    for schema in [*SCHEMAS.values(), *(s for v in VARIANTS.values() for s in v)]:
        for key, (kind, doc) in leaf_docs(schema).items():
            assert kind and doc and "\n" not in doc, f"{schema.__name__}.{key} needs a one-line doc"


# ------------------------------------------------------------------------------------------------- what is refused

@pytest.mark.parametrize("overrides,message", [
    (["contrast.extra_examples=lots"], "contrast.extra_examples=lots: expected an integer (extra bank items per step"),
    (["trainer.resume=maybe"], "trainer.resume=maybe: expected true or false"),
    (["trainer.lr=null"], "trainer.lr=null: expected a number"),
    (["data.dir=[1]"], "data.dir=[1]: expected a string or null"),
    (["method=cap_f", "prune.sequence=[a,b]"], "prune.sequence=[a,b]: expected a list of numbers"),
    (["method=cap_f", "prune.min_heads_per_layr=2"], "prune.min_heads_per_layr: no such key; did you mean "
                                                     "prune.min_heads_per_layer"),
    (["foo=1"], "foo: no such key; python -m cap --help lists the keys"),
    (["prune.sequence=[0.5]"], "prune.sequence: not a key of this composition; it comes with method=cap_f"),
    (["method=cap_f", "prune.final=0.1"], "prune.final: not a key of this composition; it comes with method=cap_m"),
    (["logger.tags=[x]"], "logger.tags: not a key of this composition; it comes with logger=wandb"),
    (["task=nope"], "task=nope: no such option; choose one of cola, mnli, mrpc, qnli, qqp, rte, squad, sst2, stsb, "
                    "wnli"),
    (["+trainer.lr=1"], "+trainer.lr: trainer.lr exists already: drop the + to set it"),
    (["~trainer.lr"], "~trainer.lr: a key of the schema cannot be deleted"),
    (["data.eval_split=[a"], "data.eval_split=[a: Hydra cannot parse it"),
])
def test_composition_errors_name_the_key_in_one_line(overrides, message):
    line = refused(*overrides)
    assert line.startswith(message) and "\n" not in line, line


@pytest.mark.parametrize("preset,message", [
    ("trainer:\n  lrr: 1.0e-5\n", "experiment/mine.yaml: trainer.lrr: no such key; did you mean trainer.lr?"),
    ("defaults:\n  - override /method: cap_f\nprune:\n  retrain_epochs: two\n",
     "experiment/mine.yaml: prune.retrain_epochs=two: expected an integer (epochs of retraining"),
])
def test_a_preset_of_ones_own_with_a_bad_key_names_its_file(tmp_path, preset, message):
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text("# @package _global_\n" + preset)
    with initialize_config_dir(config_dir=str(tmp_path / "conf"), version_base="1.3"):
        with pytest.raises(CompactHydraException) as err:
            compose("config", ["experiment=mine"])
    assert explain(err.value).startswith(message), explain(err.value)


@pytest.mark.parametrize("overrides,message", [
    (["+trainer.lrr=1"], "trainer.lrr: no such key; did you mean trainer.lr?"),  # Hydra's + adds it to the schema
    (["method=cap_m", "+prune.sequence=[0.5]"], "prune.sequence: not a key of this composition; it comes with "
                                                "method=cap_f"),
    (["+prune.sequence=[0.5]"], "prune.sequence: not a key of this composition; it comes with method=cap_f"),
    (["trainer.batch_size=${seed}x"], "trainer.batch_size=${seed}x: expected an integer"),  # checked when resolved
])
def test_what_composition_lets_through_is_refused_by_check(overrides, message):
    cfg = composed(overrides)
    for checker in (check, validate):
        with pytest.raises(UserError) as err:
            checker(cfg)
        assert str(err.value).startswith(message), str(err.value)


def test_numbers_given_as_strings_are_converted():
    cfg = composed(["trainer.lr='2e-5'", "trainer.batch_size='8'", "trainer.warmup=11000"])
    assert (cfg.trainer.lr, cfg.trainer.batch_size, cfg.trainer.warmup) == (2e-5, 8, 11000.0)
    assert type(cfg.trainer.lr) is float and type(cfg.trainer.batch_size) is int


@pytest.mark.parametrize("warmup", ["-1", "1.5", "nan"])
def test_warmup_is_a_fraction_or_a_whole_number_of_updates(warmup):
    with pytest.raises(UserError, match=f"trainer.warmup={warmup}"):
        validate(composed([f"trainer.warmup={warmup}"]))


# ------------------------------------------------------------------------------------------------------- presets

@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_under_the_schema(name):
    cfg = composed([f"experiment={name}"])
    check(cfg)
    assert OmegaConf.get_type(cfg) is CAPConfig
    assert OmegaConf.get_type(cfg.prune) is PRUNE_SCHEMA[cfg.method.name]
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("method", PRUNE_SCHEMA)
@pytest.mark.parametrize("task", ["sst2", "mnli", "stsb", "squad"])
@pytest.mark.parametrize("logger", ["none", "wandb"])
def test_every_method_task_and_logger_composes_under_the_schema(method, task, logger):
    # the bare movement methods keep QQP's W (11,000 updates), which the smaller tasks' runs cannot fit: validate
    # refuses that (tests/test_movement.py), so W is given as a fraction here
    fit = ["trainer.warmup=0.1"] if method in ("cap_m", "cap_soft") else []
    cfg = composed([f"method={method}", f"task={task}", f"logger={logger}", *fit])
    validate(cfg)
    assert OmegaConf.get_type(cfg.prune) is PRUNE_SCHEMA[method]
    assert cfg.logger.name == logger


def test_the_data_node_and_the_teacher_cache_key_are_those_of_before_the_schema(monkeypatch):
    monkeypatch.delenv("CAP_DATA_DIR", raising=False)
    monkeypatch.delenv("CAP_CACHE_DIR", raising=False)
    old_path = ["trainer.precision=fp32", "data.group_by_length=false", "teacher.cache_outputs=false"]
    cfg = composed(["experiment=quickstart", *old_path])
    assert OmegaConf.to_container(cfg.data, resolve=True) == {
        "dir": None, "train_split": "train", "eval_split": ["validation"], "max_train_samples": 2000, "seed": 42,
        "max_eval_samples": None, "max_seq_length": 128, "doc_stride": 128, "max_query_length": 64, "cache_dir": None,
        "validation_from_train": None, "group_by_length": False}
    # the hash of the untyped config's values: the old path finds the teachers cached before the keys it now has
    assert teacher_run(cfg)[0].name == "sst2-30807f1467"
    # the teacher's cached outputs are not part of what it learns
    assert teacher_run(composed(["experiment=quickstart", *old_path[:2]]))[0].name == "sst2-30807f1467"
    held_out = composed(["experiment=quickstart", *old_path, "data.validation_from_train=0.1"])
    assert teacher_run(held_out)[0].name != "sst2-30807f1467"  # a teacher that saw other rows
    # a teacher trained in bf16, or on length-grouped batches, is another teacher
    assert teacher_run(composed(["experiment=quickstart", "trainer.precision=bf16", *old_path[1:]]))[0].name \
        != "sst2-30807f1467"
    assert teacher_run(composed(["experiment=quickstart", *old_path[:1]]))[0].name != "sst2-30807f1467"


# ------------------------------------------------------------------------------------------------- run-dir names

@pytest.mark.parametrize("name", [
    "", "seed=1", "data.max_train_samples=64", "trainer.lr=5e-5", "experiment=paper/cap_m/qqp_90",
    "contrast.fic=False,experiment=minilm/sst2_reproduction,seed=1",  # results/minilm-sst2/runs/ (committed)
    "+contrast.x=1,model.name_or_path=/data/bert-base@v2:main",
])
def test_simple_run_dir_names_are_unchanged(name):
    assert dirname(name) == name


@pytest.mark.parametrize("name,safe", [
    ("prune.sequence=[0.3,0.6,0.9]", "prune.sequence=0.3,0.6,0.9"),
    ("data.eval_split=[validation_matched,validation_mismatched]",
     "data.eval_split=validation_matched,validation_mismatched"),
    ("model.name_or_path='/my models/bert'", "model.name_or_path=/my%20models/bert"),
    ("teacher.path=/ckpt/*,trainer.lr=${x}", "teacher.path=/ckpt/%2A,trainer.lr=%24%7Bx%7D"),
    ("logger.entity=a%20b;rm -rf ~", "logger.entity=a%2520b%3Brm%20-rf%20%7E"),
    ("model.name_or_path=bért", "model.name_or_path=b%C3%A9rt"),
])
def test_unsafe_characters_in_run_dir_names_are_mapped(name, safe):
    assert dirname(name) == safe
    assert shlex.quote(safe) == safe  # a shell takes it unquoted


def test_distinct_values_keep_distinct_run_dirs():
    names = ["model.name_or_path=a b", "model.name_or_path=a_b", "model.name_or_path=a%20b", "model.name_or_path=a+b"]
    assert len({dirname(n) for n in names}) == len(names)


def test_hydra_run_and_sweep_dirs_use_the_rule():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dirs = {}
        for overrides in (["seed=1"], ["prune.sequence=[0.3,0.6]", "method=cap_f", "seed=2"],
                          ["seed=2", "method=cap_f", "prune.sequence=[0.3,0.6]"]):
            cfg = compose("config", overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            dirs[" ".join(overrides)] = (cfg.hydra.run.dir, cfg.hydra.sweep.subdir)
    assert list(dirs.values()) == [
        ("runs/sst2/finetune/seed=1", "sst2/finetune/seed=1"),
        ("runs/sst2/cap_f/prune.sequence=0.3,0.6,seed=2", "sst2/cap_f/prune.sequence=0.3,0.6,seed=2"),
        ("runs/sst2/cap_f/prune.sequence=0.3,0.6,seed=2", "sst2/cap_f/prune.sequence=0.3,0.6,seed=2"),
    ]  # the same command, in any order, lands in the same run dir (resume relies on it)
