"""trainer.precision=auto: bf16 where the hardware runs it natively, fp32 otherwise, recorded in the run's config;
bf16 autocasts the passes and keeps fp32 master weights, optimizer state and losses."""
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification, TrainingArguments

from helpers import composed, tiny_overrides

from cap import precision
from cap.contrastive import RepresentationBank
from cap.trainer import CAPTrainer, LossWeights


@pytest.mark.parametrize("found, expected", [(None, "fp32"), ("AVX512-BF16", "bf16"), ("AMX-BF16", "bf16")])
def test_auto_follows_the_cpus_bf16_instructions(monkeypatch, found, expected):
    monkeypatch.setattr(precision, "cpu_bf16", lambda: found)
    resolved, reason = precision.resolve("auto", torch.device("cpu"))
    assert resolved == expected
    assert (found or "no native bf16") in reason
    assert precision.resolve("fp32", torch.device("cpu"))[0] == "fp32"  # an explicit choice stays
    assert precision.resolve("bf16", torch.device("cpu"))[0] == "bf16"


def test_auto_on_a_gpu_asks_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve("auto", torch.device("cuda"))[0] == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve("auto", torch.device("cuda"))[0] == "bf16"


def test_cpu_capability_reads_torch_or_the_kernels_flags(monkeypatch):
    assert precision.cpu_bf16() in (None, "AMX-BF16", "AVX512-BF16")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # an older torch: /proc/cpuinfo decides
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert precision.cpu_bf16() == "AVX512-BF16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    assert precision.cpu_bf16() is None


def test_a_run_records_the_precision_it_resolved(tiny_model_dir, data_dir, tmp_path, monkeypatch, capsys):
    from cap.recipes import run

    monkeypatch.setattr(precision, "cpu_bf16", lambda: None)
    cfg = composed([*tiny_overrides(tiny_model_dir, "sst2"), "trainer.max_steps=1"])
    assert cfg.trainer.precision == "auto"
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")  # as Hydra writes it before the run
    run(cfg, tmp_path)
    assert "trainer.precision=auto: fp32 (no native bf16 on this CPU)" in capsys.readouterr().out
    assert OmegaConf.load(tmp_path / ".hydra" / "config.yaml").trainer.precision == "fp32"


def _toy_dataset(n=16):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 12, (n,), generator=g).tolist()
    ids = [[101] + torch.randint(1000, 2000, (k - 1,), generator=g).tolist() for k in lengths]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                              "labels": [x[1] % 2 for x in ids], "idx": list(range(n))})


def test_bf16_runs_autocast_over_fp32_master_weights(tiny_model_dir, tokenizer, tmp_path):
    from transformers import DataCollatorWithPadding

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, bf16=True,
                             use_cpu=True, report_to=[], remove_unused_columns=False, save_strategy="no",
                             learning_rate=1e-3, disable_tqdm=True)
    data = _toy_dataset()
    bank = RepresentationBank(len(data), model.config.hidden_size, 1, labels=torch.tensor(data["labels"]))
    bank.append(torch.nn.functional.normalize(torch.randn(len(data), model.config.hidden_size), dim=-1))
    trainer = CAPTrainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer),
                         weights=LossWeights(ce=1.0), banks={"prc": bank})
    seen = []
    hook = model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda m, a, out: seen.append(out.dtype))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    terms, outputs = trainer.loss_terms(model, batch)
    assert seen == [torch.bfloat16]  # the forward computes in bf16
    assert all(t.dtype == torch.float32 for t in terms.values())  # CE and the contrastive term in fp32 (spec Q21)
    trainer.train()
    hook.remove()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = trainer.optimizer.state_dict()["state"]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # and it learned
