"""Does `torch.compile` pay for itself on a CPU training run? (issue #25: "only where it wins end to end, compile time
included"). The optimistic case: the stock embedded MiniLM classifier (no masks, hooks or parametrizations, which
would add graph breaks), one bf16-autocast training update (forward, backward, gradient clipping, fused AdamW) at
batch 16 over the lengths of real SST-2 batches, eager against `torch.compile(model, dynamic=True)`.

Measured in one run: the compile time (the first updates of the compiled model, until every length shape has been
seen once, minus what eager takes for them), the median per-round ratio of an update's time (`interleaved.py`), and
the updates a run must make before compiling has paid back its compile time.

    CAP_DATA_DIR=../shared/data python scripts/bench_compile.py [--rounds 9]  -> results/bench/compile.json
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cap.data import read_glue_split
from cap.models import resolve_model_path
from cap.precision import cpu_bf16, cpu_flags, cpu_name

from interleaved import interleaved_ratio

REPO = Path(__file__).resolve().parents[1]
BATCH = 16


def batches(tokenizer, n: int = 12) -> list[dict]:
    """`n` batches of 16 SST-2 training sentences, each padded to its own longest (random batches)."""
    rows = read_glue_split(os.environ.get("CAP_DATA_DIR"), "sst2", "train").shuffle(seed=0).select(range(n * BATCH))
    out = []
    for i in range(n):
        part = rows[i * BATCH:(i + 1) * BATCH]
        enc = tokenizer(part["sentence"], padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc["labels"] = torch.tensor(part["label"])
        out.append(dict(enc))
    return out


def updater(path: str, compiled: bool):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, fused=True)
    forward = torch.compile(model, dynamic=True) if compiled else model

    def update(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "compile.json")
    a = parser.parse_args()
    torch.manual_seed(0)
    path = resolve_model_path("minilm")
    data = batches(AutoTokenizer.from_pretrained(path))
    eager, compiled = updater(path, False), updater(path, True)
    first = {}
    for name, update in (("eager", eager), ("compiled", compiled)):
        start = time.perf_counter()
        for batch in data:  # every length once: the compiled model traces, then reuses its dynamic-shape graph
            update(batch)
        first[name] = time.perf_counter() - start

    def epoch(update):
        return lambda: [update(b) for b in data]

    timing = interleaved_ratio(epoch(eager), epoch(compiled), rounds=a.rounds, min_seconds=1.0)
    per_update = {k: timing[f"{k}_s"] / len(data) for k in ("baseline", "candidate")}
    compile_s = first["compiled"] - first["eager"]
    saved = per_update["baseline"] - per_update["candidate"]
    result = {
        "machine": {"cpu": cpu_name(), "cpu_bf16": cpu_bf16(), "flags": sorted(cpu_flags()),
                    "cpus": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__},
        "setting": f"stock MiniLM classifier, batch {BATCH}, {len(data)} SST-2 training batches (lengths "
                   f"{sorted({b['input_ids'].shape[1] for b in data})}), bf16 autocast, clip 1.0, fused AdamW",
        "rounds": a.rounds,
        "eager_ms_per_update": round(1000 * per_update["baseline"], 1),
        "compiled_ms_per_update": round(1000 * per_update["candidate"], 1),
        "compiled_over_eager": round(timing["ratio"], 3),
        "ratio_range": [round(r, 3) for r in timing["ratio_range"]],
        "ratios": [round(r, 3) for r in timing["ratios"]],
        "compile_s": round(compile_s, 1),
        "updates_to_pay_back_compile": round(compile_s / saved) if saved > 0 else None,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
