"""Cost of CAP's contrastive terms, measured in one run on MiniLM (batch 32, seq 128, 4096 extras, banks R = 1, 1, 8):

(a) CAP training step / plain CE+KD training step (target <= 1.10 on CPU),
(b) bank-encoding throughput / plain eval-forward throughput (target >= 0.9),
(c) bank bytes / (N · R · H · itemsize) (1.0: no hidden copies).

(a) and (b) time their two things interleaved and report the median of the per-round ratios (`interleaved.py`).

    python scripts/bench_contrastive.py [--items 67349] [--rounds 5]   -> results/bench/contrastive.json
"""
import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from cap.banks import encode_into
from cap.contrastive import RepresentationBank
from cap.models import resolve_model_path
from cap.trainer import CAPTrainer, Contrast, LossWeights

from interleaved import interleaved_ratio

REPO = Path(__file__).resolve().parents[1]
BATCH, SEQ = 32, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=67349, help="bank rows N (default: SST-2's training set)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--encode-items", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    path = resolve_model_path("minilm")
    student = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    hidden = student.config.hidden_size
    n = args.items
    labels = torch.randint(0, 2, (n,))
    banks = {}
    for name, reps in (("prc", 1), ("fic", 1), ("snc", 8)):
        bank = RepresentationBank(n, hidden, max_reps=reps, labels=labels)
        for _ in range(reps):
            bank.append(F.normalize(torch.randn(n, hidden), dim=-1))
        banks[name] = bank

    batch = {"input_ids": torch.randint(1000, 30000, (BATCH, SEQ)), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
             "token_type_ids": torch.zeros(BATCH, SEQ, dtype=torch.long), "labels": labels[:BATCH],
             "idx": torch.randperm(n)[:BATCH]}
    weights = LossWeights(ce=0.1, kd=0.9, kd_temperature=2.0)
    out = tempfile.mkdtemp()
    targs = TrainingArguments(output_dir=out, report_to=[], remove_unused_columns=False, per_device_train_batch_size=BATCH)
    plain = CAPTrainer(model=student, args=targs, weights=weights, teacher=teacher)
    cap = CAPTrainer(model=student, args=targs, weights=weights, teacher=teacher, banks=banks,
                     contrast=Contrast(temperature=0.1, unsup_weight=0.1, sup_weight=10.0, extra_examples=4096))
    student.train()

    def step(trainer):
        def run():
            loss = trainer.compute_loss(student, batch)
            loss.backward()
            student.zero_grad(set_to_none=True)
        return run

    steps = interleaved_ratio(step(plain), step(cap), args.rounds, min_seconds=0)

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.randint(1000, 30000, (args.encode_items, SEQ))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * SEQ] * args.encode_items})
    collator = DataCollatorWithPadding(tokenizer)
    plain_eval = torch.utils.data.DataLoader(data, batch_size=128, collate_fn=collator)

    @torch.no_grad()
    def eval_forward():
        student.eval()
        for b in plain_eval:
            student(**b)

    def encode():
        bank = RepresentationBank(args.encode_items, hidden, max_reps=1)
        encode_into(bank, student, data, collator, batch_size=128)

    passes = interleaved_ratio(eval_forward, encode, max(3, args.rounds // 2 + 1), min_seconds=0)
    eval_s, encode_s = passes["baseline_s"], passes["candidate_s"]

    expected = sum(b.n_items * b.max_reps * hidden * b.storage.element_size() for b in banks.values())
    result = {
        "model": "all-MiniLM-L6-v2", "batch": BATCH, "seq": SEQ, "extra_examples": 4096, "bank_items": n,
        "bank_reps": {k: b.max_reps for k, b in banks.items()}, "bank_dtype": "float16",
        "rounds": args.rounds, "plain_step_s": round(steps["baseline_s"], 4), "cap_step_s": round(steps["candidate_s"], 4),
        "step_ratio": round(steps["ratio"], 3), "step_ratio_range": [round(r, 3) for r in steps["ratio_range"]],
        "eval_items_per_s": round(args.encode_items / eval_s, 1), "encode_items_per_s": round(args.encode_items / encode_s, 1),
        "encode_throughput_ratio": round(1 / passes["ratio"], 3),
        "encode_throughput_ratio_range": [round(1 / r, 3) for r in reversed(passes["ratio_range"])],
        "bank_bytes": sum(b.nbytes for b in banks.values()), "bank_bytes_expected": expected,
        "bank_bytes_ratio": round(sum(b.nbytes for b in banks.values()) / expected, 3),
        "note": "ratios: median over rounds of the per-round ratio (the two timed back to back); *_s and "
                "*_items_per_s: from each one's median time, so their quotient need not equal the ratio",
        "machine": {"cpus": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    print(f"(a) CAP step / plain CE+KD step: {result['step_ratio']:.3f}  (target <= 1.10)")
    print(f"(b) bank encoding / plain eval throughput: {result['encode_throughput_ratio']:.3f}  (target >= 0.9)")
    print(f"(c) bank bytes / N·R·H·itemsize: {result['bank_bytes_ratio']:.3f}  ({result['bank_bytes'] / 2**20:.0f} MiB)")
    target = REPO / "results" / "bench" / "contrastive.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
