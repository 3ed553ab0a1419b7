"""Scaling out on CPU: two processes (torchrun, gloo) prune like one; bf16 autocast keeps ids integer, banks
float16 and losses float32.

A 2-process run is `torchrun --nproc_per_node 2 scripts/distributed_check.py OUT <overrides>`: the script runs
`python -m cap` in each process and saves what that rank held. The reference runs the same script in one process
with the same global batch (1 x 8 against 2 x 4). Two things make two processes differ from one by more than float
noise, so these comparisons switch them off: dropout (one draw for a batch of 8 is not two draws for batches of 4;
the model here has none) and CAP's contrastive weights (its candidates include the batch's own items, so a batch of
4 is another objective than a batch of 8; with contrast.unsup_weight=sup_weight=0 the banks are still built,
gathered and saved). With the full loss the ranks still agree exactly with each other.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from helpers import composed, tiny_overrides

import cap.trainer
from cap.recipes import run
from cap.trainer import CAPTrainer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "distributed_check.py"
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")
NOT_DATA_PARALLEL = ("an update of 2 x 4 examples should be half an epoch of the 16: the Trainer trained each process "
                     "on its own; on a CPU-only machine TrainingArguments needs use_cpu=True (cap/recipes/common.py)")


@pytest.fixture(scope="module")
def dropout_free_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    model = AutoModel.from_pretrained(tiny_model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def overrides(model_dir, teacher_dir, data_dir, batch_size, *extra):
    base = [o for o in tiny_overrides(model_dir, "sst2") if not o.startswith("trainer.batch_size=")]
    return [*base, f"trainer.batch_size={batch_size}", f"teacher.path={teacher_dir}", f"data.dir={data_dir}",
            "contrast.unsup_weight=0", "contrast.sup_weight=0", "trainer.precision=fp32", *extra]


def launch(n_processes: int, out: Path, run_dir: Path, args: list[str]) -> list[dict]:
    """Run scripts/distributed_check.py in `n_processes` processes; what each rank recorded, by rank."""
    launcher = [] if n_processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                            f"--nproc_per_node={n_processes}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *launcher, str(SCRIPT), str(out), *args, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
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
    assert run_files(two_dir) == run_files(one_dir)
    assert not [p for p in two_dir.rglob("*") if p.name.endswith((".tmp", ".old"))]
    # what rank 1 opened for writing, made or renamed inside the run dir: Hydra's own files (cap/__main__.py runs
    # in every process) and the checkpoint folder of its rng_state_1.pth, nothing of CAP's
    for path in {Path(p) for p in rank1["writes"]}:
        if path == two_dir or two_dir in path.parents:
            name = str(path.relative_to(two_dir))
            assert name in (".", "__main__.log") or name.startswith(".hydra") or re.search(
                r"checkpoints/checkpoint-\d+$", name), f"rank 1 wrote {name}"


def updates_and_epochs(checkpoints: Path) -> tuple[int, float]:
    """(global step, epoch) of the last checkpoint in `checkpoints`."""
    last = max(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return state["global_step"], state["epoch"]


@needs_gloo
def test_cap_f_on_two_processes_prunes_like_one(dropout_free_model_dir, sst2_teacher_dir, data_dir, tmp_path):
    extra = ["method=cap_f", "prune.sequence=[0.25,0.5]", "prune.importance_batch_size=4",  # 4 batches: 2 per rank
             "trainer.keep_checkpoints=true"]
    (one,) = launch(1, tmp_path / "out1", tmp_path / "one",
                    overrides(dropout_free_model_dir, sst2_teacher_dir, data_dir, 8, *extra))
    rank0, rank1 = launch(2, tmp_path / "out2", tmp_path / "two",
                          overrides(dropout_free_model_dir, sst2_teacher_dir, data_dir, 4, *extra))
    assert updates_and_epochs(tmp_path / "two" / "stages" / "0.25" / "checkpoints") == (2, 1.0), NOT_DATA_PARALLEL

    # every rank holds the same banks and prunes the same units
    assert same(rank0["snapshots"], rank1["snapshots"]) and same(rank0["selections"], rank1["selections"])
    assert len(rank0["snapshots"]) == 3  # FiC (teacher), PrC (before step 1), one SnC (before step 2)
    # ... as one process does: importance summed over the batches of both ranks, banks gathered in dataset order
    assert max(map(stored_diff, one["snapshots"], rank0["snapshots"])) <= 1e-3
    assert same(one["selections"], rank0["selections"])
    for name in ("fic", "prc", "snc"):
        a, b = (load_file(str(d / "stages" / "0.5" / "selected" / f"{name}.safetensors"))["vectors"]
                for d in (tmp_path / "one", tmp_path / "two"))
        assert a.dtype == b.dtype == torch.float16 and (a.float() - b.float()).abs().max() <= 1e-3, name
    assert set(rank0["draw_seeds"]).isdisjoint(rank1["draw_seeds"])  # extras drawn per rank (Q4)
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two")]
    assert [r["accuracy"] for r in metrics[0]] == [r["accuracy"] for r in metrics[1]]
    check_files(tmp_path / "one", tmp_path / "two", rank1)


@needs_gloo
def test_cap_m_on_two_processes_prunes_like_one(dropout_free_model_dir, sst2_teacher_dir, data_dir, tmp_path):
    extra = ["method=cap_m", "trainer.max_steps=-1", "trainer.epochs=2", "trainer.warmup=1", "prune.initial_warmup=0",
             "prune.final_warmup=1", "prune.final=0.5", "trainer.keep_checkpoints=true"]  # 4 updates, final at the last
    (one,) = launch(1, tmp_path / "out1", tmp_path / "one",
                    overrides(dropout_free_model_dir, sst2_teacher_dir, data_dir, 8, *extra))
    rank0, rank1 = launch(2, tmp_path / "out2", tmp_path / "two",
                          overrides(dropout_free_model_dir, sst2_teacher_dir, data_dir, 4, *extra))
    assert updates_and_epochs(tmp_path / "two" / "checkpoints") == (4, 2.0), NOT_DATA_PARALLEL

    assert same(rank0["snapshots"], rank1["snapshots"]) and same(rank0["movement_masks"], rank1["movement_masks"])
    assert len(rank0["snapshots"]) == 3  # FiC, PrC (epoch 0), one SnC (epoch 1)
    assert max(map(stored_diff, one["snapshots"], rank0["snapshots"])) <= 1e-3
    masks_one, masks_two = one["movement_masks"], rank0["movement_masks"]
    entries = sum(m.numel() for m in masks_one.values())
    kept = [sum(int(m.sum()) for m in masks.values()) for masks in (masks_one, masks_two)]
    assert kept[0] == kept[1] == entries // 2
    # Top-K after a few updates could flip on float noise; measured: no entry differs
    assert sum(int((masks_one[k] != masks_two[k]).sum()) for k in masks_one) < 0.01 * entries
    assert set(rank0["draw_seeds"]).isdisjoint(rank1["draw_seeds"])
    for name in ("fic", "prc", "snc"):
        a, b = (load_file(str(tmp_path / d / "banks" / f"{name}.safetensors"))["vectors"] for d in ("one", "two"))
        assert a.dtype == b.dtype == torch.float16 and (a.float() - b.float()).abs().max() <= 1e-3, name
    check_files(tmp_path / "one", tmp_path / "two", rank1)


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
