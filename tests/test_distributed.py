"""Scaling out on CPU: the paper presets on two processes (torchrun, gloo) run end to end like one process with the
same global batch; bf16 autocast keeps ids integer, banks float16 and losses float32.

A 2-process run is `torchrun --nproc_per_node 2 tests/helpers/distributed_check.py OUT <overrides>`: the script runs
`python -m cap` in each process and saves what that rank held. The reference runs the same script in one process
with the same global batch of 8 made of two accumulated micro-batches of 4 (`trainer.device_batch_size=4`): the same
micro-batches, so the same in-batch contrastive candidates and the same extra draws (each micro-batch draws what the
rank training it would), and the same teacher fine-tuned first (no `teacher.path`: under the launcher for two
processes). What differs is float summation order (gradients all-reduced against accumulated), so weights and
metrics agree to float tolerance. Dropout would differ (one process draws for both micro-batches): the model here
has none.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from helpers import composed, tiny_overrides

import cap.trainer
from cap.distributed import job_lock
from cap.recipes import run
from cap.trainer import CAPTrainer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "helpers" / "distributed_check.py"
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")
NOT_DATA_PARALLEL = ("an update of 2 x 4 examples should be half an epoch of the 16: the Trainer trained each process "
                     "on its own; on a CPU-only machine TrainingArguments needs use_cpu=True (cap/recipes/common.py)")
# the README's presets, cut to a tiny run: two CAP-f steps of one epoch; CAP-m over two epochs, final at the last
PAPER = {
    "cap_f": ["experiment=paper/cap_f/sst2", "prune.sequence=[0.25,0.5]", "prune.retrain_epochs=1",
              "prune.importance_batch_size=4"],  # 4 importance batches: 2 per rank
    "cap_m": ["experiment=paper/cap_m/qqp_90", "trainer.epochs=2", "trainer.warmup=1", "prune.initial_warmup=0",
              "prune.final_warmup=1", "prune.final=0.5"],
}


@pytest.fixture(scope="module")
def dropout_free_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    model = AutoModel.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def paper_overrides(method, model_dir, data_dir, teachers, *extra):
    task = "qqp" if method == "cap_m" else "sst2"
    base = [o for o in tiny_overrides(model_dir, task) if not o.startswith(("task=", "trainer.max_steps="))]
    return [*PAPER[method], *base, "trainer.max_steps=-1", f"data.dir={data_dir}", f"teacher.cache_dir={teachers}",
            "teacher.epochs=1", "contrast.extra_examples=8", "trainer.precision=fp32", "trainer.keep_checkpoints=true",
            *extra]


def launch(n_processes: int, out: Path, run_dir: Path, args: list[str], env: dict | None = None,
           check: bool = True) -> list[dict]:
    """Run tests/helpers/distributed_check.py in `n_processes` processes; what each rank recorded, by rank."""
    launcher = [] if n_processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                            f"--nproc_per_node={n_processes}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run([sys.executable, *launcher, str(SCRIPT), str(out), *args, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if not check:
        return done
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(n_processes)]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    return a == b


def stored_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two snapshots once stored in a float16 bank."""
    return (a.half().float() - b.half().float()).abs().max().item()


def run_files(run_dir: Path) -> set[str]:
    """The files under `run_dir`; the Trainer's `rng_state_0.pth` named as one process names it, and rank 1's
    `rng_state_1.pth` (the one file the Trainer writes per rank) left out."""
    names = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}
    return {re.sub(r"rng_state_0\.pth$", "rng_state.pth", n) for n in names if not n.endswith("rng_state_1.pth")}


def check_files(one_dir: Path, two_dir: Path, rank1: dict) -> None:
    """The 2-process run wrote the files the 1-process run did, and only rank 0 wrote them: what rank 1 opened for
    writing, made or renamed inside the run dir is its checkpoints' rng_state_1.pth (and the folders they are in)."""
    assert run_files(two_dir) == run_files(one_dir)
    assert not [p for p in two_dir.rglob("*") if p.name.endswith((".tmp", ".old"))]
    for path in {Path(p) for p in rank1["writes"]}:
        if path == two_dir or two_dir in path.parents:
            name = str(path.relative_to(two_dir))
            assert name == "." or re.search(r"checkpoints/checkpoint-\d+(/rng_state_1\.pth)?$", name), \
                f"rank 1 wrote {name}"


def check_teacher(one: Path, two: Path, rank1: dict) -> None:
    """Each launch fine-tuned its own teacher (no teacher.path), the same one; rank 1 wrote none of its files."""
    (one_teacher,), (two_teacher,) = ([p for p in d.iterdir() if p.is_dir()] for d in (one, two))  # no .lock
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (one_teacher, two_teacher))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [json.loads((d / "metrics.json").read_text()) for d in (one_teacher, two_teacher)] == [
        json.loads((one_teacher / "metrics.json").read_text())] * 2
    check_files(one_teacher, two_teacher, rank1)


def updates_and_epochs(checkpoints: Path) -> tuple[int, float]:
    """(global step, epoch) of the last checkpoint in `checkpoints`."""
    last = max(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return state["global_step"], state["epoch"]


def accuracies(run_dir: Path) -> list[float]:
    return [row["accuracy"] for row in json.loads((run_dir / "metrics.json").read_text())]


@pytest.fixture(scope="module")
def cap_f_runs(dropout_free_model_dir, data_dir, tmp_path_factory):
    """The CAP-f preset in one process (2 x 4 accumulated) and on two (4 each), each fine-tuning its teacher first."""
    tmp = tmp_path_factory.mktemp("cap-f-runs")
    (one,) = launch(1, tmp / "out1", tmp / "one", paper_overrides("cap_f", dropout_free_model_dir, data_dir,
                                                                    tmp / "teachers1", "trainer.device_batch_size=4"))
    two = launch(2, tmp / "out2", tmp / "two", paper_overrides("cap_f", dropout_free_model_dir, data_dir,
                                                                 tmp / "teachers2"))
    return tmp, one, two


@pytest.mark.slow
@needs_gloo
def test_cap_f_preset_on_two_processes_prunes_like_one(cap_f_runs):
    tmp, one, (rank0, rank1) = cap_f_runs
    assert updates_and_epochs(tmp / "two" / "stages" / "0.25" / "checkpoints") == (2, 1.0), NOT_DATA_PARALLEL
    assert updates_and_epochs(tmp / "one" / "stages" / "0.25" / "checkpoints") == (2, 1.0)  # 4 micro-batches
    check_teacher(tmp / "teachers1", tmp / "teachers2", rank1)

    # every rank holds the same banks and prunes the same units
    assert same(rank0["snapshots"], rank1["snapshots"]) and same(rank0["selections"], rank1["selections"])
    assert len(rank0["snapshots"]) == 3  # FiC (teacher), PrC (before step 1), one SnC (before step 2)
    # ... as one process does: importance summed over the batches of both ranks, banks gathered in dataset order,
    # the full loss over the same micro-batches with the same extra draws
    assert max(map(stored_diff, one["snapshots"], rank0["snapshots"])) <= 1e-3
    assert same(one["selections"], rank0["selections"])
    for name in ("fic", "prc", "snc"):
        a, b = (load_file(str(tmp / d / "stages" / "0.5" / "selected" / f"{name}.safetensors"))["vectors"]
                for d in ("one", "two"))
        assert a.dtype == b.dtype == torch.float16 and (a.float() - b.float()).abs().max() <= 1e-3, name
    assert set(one["draw_seeds"]) == set(rank0["draw_seeds"]) | set(rank1["draw_seeds"])
    # in training, extras are drawn per rank (Q4); the importance pass draws, on every rank, from the stage
    # Trainer's generator as it was made (seed=42): what one process passing every batch draws
    assert (set(rank0["draw_seeds"]) - {42}).isdisjoint(set(rank1["draw_seeds"]) - {42})
    a, b = (load_file(str(tmp / d / "model" / "model.safetensors")) for d in ("one", "two"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert accuracies(tmp / "one") == accuracies(tmp / "two")
    check_files(tmp / "one", tmp / "two", rank1)


@pytest.mark.slow
@needs_gloo
def test_cap_m_preset_on_two_processes_prunes_like_one(dropout_free_model_dir, data_dir, tmp_path):
    (one,) = launch(1, tmp_path / "out1", tmp_path / "one", paper_overrides(
        "cap_m", dropout_free_model_dir, data_dir, tmp_path / "teachers1", "trainer.device_batch_size=4"))
    rank0, rank1 = launch(2, tmp_path / "out2", tmp_path / "two", paper_overrides(
        "cap_m", dropout_free_model_dir, data_dir, tmp_path / "teachers2"))
    assert updates_and_epochs(tmp_path / "two" / "checkpoints") == (4, 2.0), NOT_DATA_PARALLEL
    check_teacher(tmp_path / "teachers1", tmp_path / "teachers2", rank1)

    assert same(rank0["snapshots"], rank1["snapshots"]) and same(rank0["movement_masks"], rank1["movement_masks"])
    assert len(rank0["snapshots"]) == 3  # FiC, PrC (epoch 0), one SnC (epoch 1)
    assert max(map(stored_diff, one["snapshots"], rank0["snapshots"])) <= 1e-3
    masks_one, masks_two = one["movement_masks"], rank0["movement_masks"]
    entries = sum(m.numel() for m in masks_one.values())
    kept = [sum(int(m.sum()) for m in masks.values()) for masks in (masks_one, masks_two)]
    assert kept[0] == kept[1] == entries // 2
    # Top-K after a few updates could flip on float noise; measured: no entry differs
    assert sum(int((masks_one[k] != masks_two[k]).sum()) for k in masks_one) < 0.01 * entries
    for name in ("fic", "prc", "snc"):
        a, b = (load_file(str(tmp_path / d / "banks" / f"{name}.safetensors"))["vectors"] for d in ("one", "two"))
        assert a.dtype == b.dtype == torch.float16 and (a.float() - b.float()).abs().max() <= 1e-3, name
    assert accuracies(tmp_path / "one") == pytest.approx(accuracies(tmp_path / "two"))
    check_files(tmp_path / "one", tmp_path / "two", rank1)


@pytest.mark.slow
@needs_gloo
def test_a_killed_rank_and_a_relaunch_resume_the_run(cap_f_runs, dropout_free_model_dir, data_dir):
    """SIGKILL of rank 1 right after the first checkpoint of the first CAP-f stage (the launcher then stops rank 0);
    the same command again resumes, and the run ends as the uninterrupted one did."""
    tmp = cap_f_runs[0]
    args = paper_overrides("cap_f", dropout_free_model_dir, data_dir, tmp / "teachers2")  # its teacher, cached
    killed = launch(2, tmp / "out-killed", tmp / "killed", args, check=False,
                    env={"CAP_KILL_AT": "checkpoint_saved", "CAP_KILL_RANK": "1"})
    assert killed.returncode != 0 and "killing the run here" in killed.stdout + killed.stderr
    assert not (tmp / "killed" / "stages" / "0.25" / "DONE").exists()
    # the README's command itself: torchrun -m cap
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "cap", *args, f"hydra.run.dir={tmp / 'killed'}"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    for stage in ("0.25", "0.5"):
        a, b = (load_file(str(tmp / d / "stages" / stage / "masks.safetensors")) for d in ("two", "killed"))
        assert same(a, b), stage
    a, b = (load_file(str(tmp / d / "model" / "model.safetensors")) for d in ("two", "killed"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert accuracies(tmp / "killed") == accuracies(tmp / "two")


def test_jobs_needing_one_teacher_take_turns(tmp_path):
    """job_lock: a second job waits while another holds the teacher's lock, and goes on once it is released."""
    from filelock import FileLock

    path = tmp_path / "sst2-abc.lock"
    holder, entered = FileLock(str(path)), threading.Event()
    holder.acquire()

    def second_job():
        with job_lock(path, "fine-tuning the teacher", poll_s=0.05):
            entered.set()

    thread = threading.Thread(target=second_job)
    thread.start()
    time.sleep(0.3)
    assert not entered.is_set()  # waiting
    holder.release()
    thread.join(timeout=10)
    assert entered.is_set()


def test_a_killed_lock_holder_does_not_block(tmp_path):
    path = tmp_path / "sst2-abc.lock"
    code = (f"import os, signal; from filelock import FileLock; FileLock({str(path)!r}).acquire(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    start = time.monotonic()
    with job_lock(path, "fine-tuning the teacher", poll_s=5):
        pass
    assert time.monotonic() - start < 2


@pytest.mark.slow
@needs_gloo
def test_two_jobs_needing_one_teacher_fine_tune_it_once(tiny_model_dir, data_dir, tmp_path):
    """Two runs started together that need the same (missing) teacher: one fine-tunes it, the other reuses it."""
    args = [*tiny_overrides(tiny_model_dir, "sst2"), "method=cap_f", "prune.sequence=[0.5]", f"data.dir={data_dir}",
            f"teacher.cache_dir={tmp_path / 'teachers'}", "teacher.epochs=1", "trainer.precision=fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    jobs = [subprocess.Popen([sys.executable, "-m", "cap", *args, f"seed={seed}", "teacher.seed=1",
                              f"hydra.run.dir={tmp_path / str(seed)}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert sum(o.count("fine-tuning a teacher into") for o in outputs) == 1, outputs
    assert len(list((tmp_path / "teachers").glob("sst2-*/model/DONE"))) == 1


MIXED_PRECISION = {
    "cap_f": ["method=cap_f", "prune.sequence=[0.25,0.5]"],
    "cap_m": ["method=cap_m", "trainer.max_steps=-1", "trainer.epochs=2", "trainer.warmup=1",
              "prune.initial_warmup=0", "prune.final_warmup=1", "prune.final=0.5"],
}


@pytest.mark.parametrize("method", sorted(MIXED_PRECISION))
def test_bf16_keeps_ids_integer_banks_float16_and_losses_float32(method, tiny_model_dir, sst2_teacher_dir, tmp_path,
                                                                 monkeypatch):
    rep_dtypes, term_dtypes = [], set()
    contrastive_loss, loss_terms = cap.trainer.contrastive_loss, CAPTrainer.loss_terms

    def checked_contrastive_loss(rep, bank, idx, extra_idx, **kwargs):
        for name, ids in (("idx", idx), ("extra_idx", extra_idx), ("labels", kwargs["labels"]),
                          ("bank_labels", kwargs["bank_labels"])):
            assert not ids.is_floating_point(), f"{name} reached the contrastive loss as {ids.dtype} (spec Q6)"
        assert bank.dtype == torch.float16
        rep_dtypes.append(rep.dtype)
        return contrastive_loss(rep, bank, idx, extra_idx, **kwargs)

    def checked_loss_terms(self, model, inputs, contrast=None):
        for name in ("input_ids", "attention_mask", "idx", "labels"):
            assert name not in inputs or not inputs[name].is_floating_point(), f"{name}: {inputs[name].dtype}"
        terms, outputs = loss_terms(self, model, inputs, contrast)
        term_dtypes.update(terms[name].dtype for name in terms)
        return terms, outputs

    monkeypatch.setattr(cap.trainer, "contrastive_loss", checked_contrastive_loss)
    monkeypatch.setattr(CAPTrainer, "loss_terms", checked_loss_terms)
    run(composed([*tiny_overrides(tiny_model_dir, "sst2"), f"teacher.path={sst2_teacher_dir}",
                  "trainer.precision=bf16", "contrast.extra_examples=8", *MIXED_PRECISION[method]]), tmp_path)
    assert torch.bfloat16 in rep_dtypes  # autocast was on: the sentence vectors came out of the model in bf16
    assert term_dtypes == {torch.float32}
    banks = [p for p in tmp_path.rglob("*.safetensors") if p.stem in ("prc", "fic", "snc")]
    assert banks and all(load_file(str(p))["vectors"].dtype == torch.float16 for p in banks)


def test_only_the_main_process_writes_hydra_files_and_a_sweep_has_one_dir(monkeypatch):
    """Under a launcher, rank 1 tells Hydra to write no `.hydra/` and no job log; under -m, every rank gets the sweep
    dir named after rank 0's clock (broadcast), not its own."""
    import cap.distributed
    from cap.__main__ import launch_overrides

    monkeypatch.setattr(cap.distributed, "join", lambda: None)
    monkeypatch.setattr(cap.distributed, "broadcast", lambda value: "2026-01-02_03-04-05")  # rank 0's clock
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launch_overrides(["task=sst2"]) == ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    assert launch_overrides(["-m", "seed=1,2"])[-1] == "hydra.sweep.dir=multiruns/2026-01-02_03-04-05"
    assert launch_overrides(["-m", "hydra.sweep.dir=mine"]) == ["hydra.output_subdir=null",
                                                                   "hydra/job_logging=stdout"]
    monkeypatch.setenv("RANK", "0")
    assert launch_overrides(["task=sst2"]) == []
    assert launch_overrides(["--multirun"]) == ["hydra.sweep.dir=multiruns/2026-01-02_03-04-05"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_overrides(["-m"]) == []


def test_the_global_batch_splits_into_device_batches_and_accumulation():
    from cap.distributed import batch_split
    from cap.errors import UserError

    assert batch_split(32, None, 1) == (32, 1)
    assert batch_split(32, None, 4) == (8, 1)
    assert batch_split(32, 4, 4) == (4, 2)  # 4 processes x 4 per device x 2 accumulation steps
    assert batch_split(32, 8, 1) == (8, 4)
    with pytest.raises(UserError, match=r"trainer.batch_size=32 \(the global batch\) does not split over 3"):
        batch_split(32, None, 3)
    with pytest.raises(UserError, match="trainer.device_batch_size=3: each of the 2 processes takes 16"):
        batch_split(32, 3, 2)
