"""Training speed on this machine, measured in one run: what bf16, length-grouped batches and the cached teacher buy.

1. The matmul rates (GFLOP/s) of fp32 and bf16 at MiniLM's shapes (its FFN's two matmuls at 2,048 tokens) and 1024³.
2. A CAP-f retraining epoch of the main job (MiniLM, 2,000 SST-2 sentences, batch 16, CE + KD + PrC/SnC/FiC) for
   {fp32, bf16} × {random, length-grouped batches} × {teacher recomputed, cached}: sentences/s, real (non-pad)
   tokens/s, the padding share, and the real-token FLOP/s as a fraction of the bf16 matmul rate.
3. The same for a CAP-soft epoch (preset minilm/sst2_cap_soft, batch 32) and for evaluating the SST-2 dev set, old
   path (fp32, random, recomputed; dataset order) against the new defaults (bf16 where native, grouped, cached).
4. CAP-f's importance pass (a second step's full loss over the main job's 1,000-sentence subset): the old path,
   bf16 batch by batch in dataset order, and the new defaults, whose forwards run the examples of several batches
   grouped by length (each batch still adds its own |dL/dm|: `cap.pruning.Packing`).

Every variant is measured in every round, the order rotating (`interleaved.py`); a ratio is the median over rounds
of the per-round ratios to the old path. Banks hold random unit vectors and the teacher is the pre-trained model
with a new head (speed does not depend on what they hold); the teacher's one pass (the cache) is timed on its own.
FLOPs count the encoder's matrix products alone: 2·P per real token forward, 6·P forward and backward (P: the
Linear weights of the encoder), so padded positions, attention scores and the teacher's forward count as overhead.

    CAP_DATA_DIR=../shared/data python scripts/bench_train.py [--rounds 3] [--updates 0]  -> results/bench/train.json
    CAP_DATA_DIR=../shared/data python scripts/bench_train.py --only importance          (that entry alone)
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from transformers import TrainerCallback
from transformers.trainer_utils import SaveStrategy

import cap  # noqa: F401  registers the config schema
from cap.banks import BankSettings, build_banks
from cap.evaluation import evaluate_task
from cap.methods import training_arguments
from cap.models import build_model
from cap.precision import cpu_bf16, cpu_flags, cpu_name, resolve
from cap.pruning import StructuredMasks
from cap.pruning.movement import MovementScores
from cap.recipes.cap_f import unit_importance
from cap.recipes.common import prepare, pruning_trainer
from cap.teacher import TeacherPassSettings, teacher_pass

from interleaved import interleaved_rounds

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"ffn_in_2048x384x1536": (2048, 384, 1536), "ffn_out_2048x1536x384": (2048, 1536, 384),
          "square_1024": (1024, 1024, 1024)}
OLD = {"trainer.precision": "fp32", "data.group_by_length": False, "teacher.cache_outputs": False}


def matmul_rates(rounds: int) -> dict:
    """GFLOP/s of fp32 and bf16 matmuls per shape, and the per-round bf16/fp32 ratio's median."""
    out = {}
    for name, (m, k, n) in SHAPES.items():
        mats = {dtype: (torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype))
                for dtype in (torch.float32, torch.bfloat16)}

        def rate(dtype):
            a, b = mats[dtype]
            torch.mm(a, b)
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < 0.3:
                torch.mm(a, b)
                calls += 1
            return 2 * m * k * n * calls / (time.perf_counter() - start) / 1e9

        per_round = interleaved_rounds({"fp32": lambda: rate(torch.float32), "bf16": lambda: rate(torch.bfloat16)},
                                       rounds)
        out[name] = {"fp32_gflops": round(statistics.median(r["fp32"] for r in per_round), 1),
                     "bf16_gflops": round(statistics.median(r["bf16"] for r in per_round), 1),
                     "bf16_over_fp32": round(statistics.median(r["bf16"] / r["fp32"] for r in per_round), 2)}
    return out


def compose_cfg(preset: str, options: dict, data_dir: str, scratch: Path):
    overrides = [f"experiment={preset}", f"data.dir={data_dir}", f"teacher.cache_dir={scratch / 'teachers'}",
                 "logger=none"] + [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def encoder_linear_params(model) -> int:
    return sum(m.weight.numel() for m in model.base_model.encoder.modules() if isinstance(m, torch.nn.Linear))


class Timer(TrainerCallback):
    """Seconds from the start of update `skip` to the end of training, and the batches trained in them."""

    def __init__(self, skip: int):
        self.skip, self.start, self.end, self.first_batch = skip, None, None, 0
        self.batches: list[tuple[int, int, int]] = []  # (sentences, real tokens, padded tokens)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.skip:
            self.start, self.first_batch = time.perf_counter(), len(self.batches)

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()

    def result(self) -> dict:
        batches = self.batches[self.first_batch:]
        seconds = self.end - self.start
        sentences, real, padded = (sum(b[i] for b in batches) for i in range(3))
        return {"seconds": seconds, "sentences": sentences, "real_tokens": real, "padded_tokens": padded}


class Bench:
    """One method's training set-up, trained for an epoch (or `updates`) under each variant of OLD's keys."""

    def __init__(self, preset: str, data_dir: str, scratch: Path, teacher_dir: Path, updates: int, method: str):
        self.cfg, self.preset = compose_cfg(preset, {}, data_dir, scratch), preset
        self.data_dir, self.scratch, self.updates, self.method = data_dir, scratch, updates, method
        self.setup = prepare(self.cfg, teacher_path=str(teacher_dir))
        model, data = self.setup.model, self.setup.data
        if method == "cap_f":  # masks (all ones) and scores cost what they cost at any level
            self.masks = StructuredMasks.from_model(model).apply(model)
        else:
            self.scores = MovementScores.attach(model, self.cfg.prune.criterion, granularity=self.cfg.prune.granularity)
            self.scores.set_level(self.cfg.prune.initial)
        self.banks = build_banks(BankSettings.from_config(self.cfg), data, model.config.hidden_size, 1)  # PrC, FiC and one SnC snapshot
        generator = torch.Generator().manual_seed(0)
        for bank in self.banks.values():
            vectors = torch.randn(len(data.train), model.config.hidden_size, generator=generator)
            bank.append(F.normalize(vectors, dim=-1))
        self.flops_per_token = 6 * encoder_linear_params(model)
        self.cached: dict[str, object] = {}
        self.teacher_pass_s: dict[str, float] = {}

    def variant_cfg(self, options: dict):
        return compose_cfg(self.preset, options, self.data_dir, self.scratch)

    def teacher_outputs(self, cfg):
        precision = cfg.trainer.precision
        if precision not in self.cached:
            start = time.perf_counter()
            self.cached[precision] = teacher_pass(TeacherPassSettings.from_config(cfg), self.setup, {},
                                                  self.scratch / f"logits-{precision}", torch.device("cpu"))
            self.teacher_pass_s[precision] = round(time.perf_counter() - start, 2)
        return self.cached[precision]

    def train(self, cfg, profile: Path | None = None) -> dict:
        args = training_arguments(cfg, self.scratch / "out", [])
        args.save_strategy = SaveStrategy.NO
        args.disable_tqdm = True
        args.num_train_epochs = cfg.prune.retrain_epochs if self.method == "cap_f" else 1
        if self.updates:
            args.max_steps = self.updates
        timer = Timer(skip=2)
        kwargs = {}
        if self.method != "cap_f":  # the recipe's optimizer: the scores in their own group
            groups = self.scores.param_groups(lr=args.learning_rate, weight_decay=args.weight_decay,
                                              score_lr=cfg.prune.score_lr)
            kwargs["optimizers"] = (torch.optim.AdamW(groups, eps=args.adam_epsilon), None)
            kwargs["regularizer"] = lambda: cfg.prune.final_lambda * self.scores.regularization()
        cached = self.teacher_outputs(cfg) if cfg.teacher.cache_outputs else None
        trainer = pruning_trainer(cfg, self.setup, args, self.banks, callbacks=[timer], teacher_outputs=cached,
                                  **kwargs)
        compute_loss = trainer.compute_loss

        def counting(model, inputs, *a, **k):
            if model.training:
                mask = inputs["attention_mask"]
                timer.batches.append((mask.size(0), int(mask.sum()), mask.numel()))
            return compute_loss(model, inputs, *a, **k)

        trainer.compute_loss = counting
        if profile is None:
            trainer.train()
        else:  # the per-op table of the run: where its time goes
            from torch.profiler import ProfilerActivity, profile as profiler

            with profiler(activities=[ProfilerActivity.CPU]) as prof:
                trainer.train()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
            profile.write_text(f"{self.method}, {cpu_name()}, {dict(cfg.trainer)['precision']}, "
                               f"group_by_length={cfg.data.group_by_length}, "
                               f"teacher.cache_outputs={cfg.teacher.cache_outputs}\n{table}\n")
        trainer.release()
        unwrap(self.setup.model)
        return timer.result()

    def importance(self, cfg) -> dict:
        """CAP-f's importance pass of a second pruning step (the full loss, contrastive terms included) over the
        main job's subset: batch by batch in dataset order, or packed (with data.group_by_length)."""
        args = training_arguments(cfg, self.scratch / "out", [])
        trainer = pruning_trainer(cfg, self.setup, args, self.banks, teacher_outputs=self.teacher_outputs(cfg)
                                  if cfg.teacher.cache_outputs else None)
        start = time.perf_counter()
        unit_importance(cfg, trainer, self.setup, self.masks, step=1)
        seconds = time.perf_counter() - start
        trainer.release()
        unwrap(self.setup.model)
        generator = torch.Generator().manual_seed(cfg.seed + 1)  # the subset unit_importance draws at step 1
        train = self.setup.data.train
        rows = torch.randperm(len(train), generator=generator)[: int(cfg.prune.importance_fraction * len(train))]
        real = sum(len(train[int(i)]["input_ids"]) for i in rows)
        return {"seconds": seconds, "sentences": len(rows), "real_tokens": real}

    def evaluate(self, cfg) -> dict:
        args = training_arguments(cfg, self.scratch / "out", [])
        args.disable_tqdm = True
        trainer = pruning_trainer(cfg, self.setup, args, {})
        start = time.perf_counter()
        evaluate_task(trainer, self.setup.data)
        seconds = time.perf_counter() - start
        unwrap(self.setup.model)
        features = self.setup.data.evals["validation"]
        real = sum(len(ids) for ids in features["input_ids"])
        return {"seconds": seconds, "sentences": len(features), "real_tokens": real}


def unwrap(model) -> None:
    """Undo Accelerate's autocast wrapper on `model.forward` (set when a bf16 Trainer prepares it), so that the next
    variant computes in its own precision."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_original_forward", None)


def summarize(per_round: list[dict], baseline: str, flops_per_token: float, bf16_rate: float, mode: str) -> dict:
    out = {}
    for name in per_round[0]:
        rows = [r[name] for r in per_round]
        sentences_s = [r["sentences"] / r["seconds"] for r in rows]
        tokens_s = [r["real_tokens"] / r["seconds"] for r in rows]
        flops = flops_per_token if mode == "train" else flops_per_token / 3
        out[name] = {
            "sentences_per_s": round(statistics.median(sentences_s), 1),
            "real_tokens_per_s": round(statistics.median(tokens_s), 1),
            "speedup_vs_old_path": round(statistics.median(
                (r[name]["real_tokens"] / r[name]["seconds"]) / (r[baseline]["real_tokens"] / r[baseline]["seconds"])
                for r in per_round), 2),
            "real_token_gflops": round(statistics.median(tokens_s) * flops / 1e9, 1),
            "fraction_of_bf16_matmul_rate": round(statistics.median(tokens_s) * flops / 1e9 / bf16_rate, 3),
            "seconds_per_round": [round(r["seconds"], 2) for r in rows],
        }
        if "padded_tokens" in rows[0]:
            out[name]["padding_share"] = round(1 - rows[0]["real_tokens"] / rows[0]["padded_tokens"], 3)
    return out


def importance_section(bench: Bench, cfgs: dict, native: str, rounds: int, bf16_rate: float) -> dict:
    """CAP-f's importance pass (a second step's, contrastive terms included) over the main job's subset: the old
    path, the new precision batch by batch in dataset order, and the new defaults (packed by length)."""
    variants = {"fp32-batch-by-batch": cfgs["fp32-random-recomputed"],
                f"{native}-batch-by-batch": cfgs[f"{native}-random-cached"],
                f"{native}-packed": cfgs[f"{native}-grouped-cached"]}
    per_round = interleaved_rounds({n: (lambda c=c: bench.importance(c)) for n, c in variants.items()}, rounds)
    # no weight gradients: a forward and a backward to the activations, about 4·P FLOPs per real token
    return summarize(per_round, "fp32-batch-by-batch", bench.flops_per_token * 2 / 3, bf16_rate, "train")


def only_importance(a) -> None:
    """--only importance: measure the importance pass alone and update its entry in the existing train.json."""
    native, _ = resolve("auto", torch.device("cpu"))
    out = Path(a.out)
    result = json.loads(out.read_text())
    with tempfile.TemporaryDirectory(prefix="cap-bench-train-") as tmp:
        scratch = Path(tmp)
        bench = Bench("quickstart", a.data_dir, scratch, make_teacher(scratch, a.data_dir), a.updates, "cap_f")
        cfgs = {name: bench.variant_cfg(options) for name, options in {
            "fp32-random-recomputed": OLD,
            f"{native}-random-cached": {"trainer.precision": native, "data.group_by_length": False},
            f"{native}-grouped-cached": {"trainer.precision": native}}.items()}
        rate = result["bf16_matmul_gflops_minilm_shapes"]
        result["importance"] = importance_section(bench, cfgs, native, a.rounds, rate)
    result["importance_cpu"] = cpu_name()
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["importance"], indent=1))


def profile(a) -> None:
    native, _ = resolve("auto", torch.device("cpu"))
    new = {"trainer.precision": native, "data.group_by_length": True, "teacher.cache_outputs": True}
    with tempfile.TemporaryDirectory(prefix="cap-profile-") as tmp:
        scratch = Path(tmp)
        teacher_dir = make_teacher(scratch, a.data_dir)
        for method, preset in (("cap_f", "quickstart"), ("cap_soft", "minilm/sst2_cap_soft")):
            bench = Bench(preset, a.data_dir, scratch, teacher_dir, a.updates, method)
            for label, options in (("old_path", OLD), ("new_defaults", new)):
                out = REPO / "results" / "bench" / f"profile_{method}_{label}.txt"
                print(json.dumps(bench.train(bench.variant_cfg(options), profile=out)))


def make_teacher(scratch: Path, data_dir: str) -> Path:
    """The pre-trained model with a new SST-2 head, saved as a checkpoint: a stand-in teacher (speed only)."""
    from cap.data import get_task
    from cap.models import load_tokenizer

    cfg = compose_cfg("quickstart", {}, data_dir, scratch)
    teacher_dir = scratch / "teacher"
    build_model(cfg.model.name_or_path, get_task("sst2")).save_pretrained(teacher_dir)
    load_tokenizer(cfg.model.name_or_path).save_pretrained(teacher_dir)
    return teacher_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=0, help="updates per measurement (0: a whole epoch)")
    parser.add_argument("--data-dir", default=os.environ.get("CAP_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--out", default=str(REPO / "results" / "bench" / "train.json"))
    parser.add_argument("--profile", action="store_true", help="instead: torch.profiler's per-op table of one epoch "
                        "(or --updates) of CAP-f and of CAP-soft, each on the old path and the new defaults "
                        "-> results/bench/profile_*")
    parser.add_argument("--only", choices=["importance"], help="measure one part alone and update its entry in "
                        "--out (which a whole run wrote before)")
    a = parser.parse_args()
    if a.profile:
        return profile(a)
    if a.only == "importance":
        return only_importance(a)
    torch.manual_seed(0)
    native, _ = resolve("auto", torch.device("cpu"))
    result = {"machine": {"cpu": cpu_name(), "cpu_bf16": cpu_bf16(), "auto_resolves_to": native,
                          "flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16",
                                                         "avx512_vnni", "amx_int8"}),
                          "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "rounds": a.rounds, "flops": __doc__.split("FLOPs count")[1].split("\n\n")[0].strip()}
    print("matmul rates ...", flush=True)
    result["matmul"] = matmul_rates(max(a.rounds, 5))
    bf16_rate = statistics.mean(result["matmul"][k]["bf16_gflops"] for k in list(SHAPES)[:2])
    result["bf16_matmul_gflops_minilm_shapes"] = round(bf16_rate, 1)

    with tempfile.TemporaryDirectory(prefix="cap-bench-train-") as tmp:
        scratch = Path(tmp)
        teacher_dir = make_teacher(scratch, a.data_dir)
        new = {"trainer.precision": native, "data.group_by_length": True, "teacher.cache_outputs": True}
        for method, preset in (("cap_f", "quickstart"), ("cap_soft", "minilm/sst2_cap_soft")):
            bench = Bench(preset, a.data_dir, scratch, teacher_dir, a.updates, method)
            if method == "cap_f":
                variants = {}
                for precision in ("fp32", native):
                    for grouped in (False, True):
                        for cached in (False, True):
                            name = f"{precision}-{'grouped' if grouped else 'random'}-" \
                                   f"{'cached' if cached else 'recomputed'}"
                            variants[name] = {"trainer.precision": precision, "data.group_by_length": grouped,
                                              "teacher.cache_outputs": cached}
            else:
                variants = {"fp32-random-recomputed": OLD, f"{native}-grouped-cached": new}
            cfgs = {name: bench.variant_cfg(options) for name, options in variants.items()}
            print(f"{method}: {len(cfgs)} variants x {a.rounds} rounds ...", flush=True)
            per_round = interleaved_rounds({n: (lambda c=c: bench.train(c)) for n, c in cfgs.items()}, a.rounds)
            result[method] = summarize(per_round, "fp32-random-recomputed", bench.flops_per_token, bf16_rate, "train")
            result[method + "_teacher_pass_s"] = bench.teacher_pass_s
            result[method + "_updates_per_measurement"] = a.updates or "one epoch"
            if method == "cap_f":
                result["importance"] = importance_section(bench, cfgs, native, a.rounds, bf16_rate)
                eval_cfgs = {"fp32-dataset-order": cfgs["fp32-random-recomputed"],
                             f"{native}-by-length": cfgs[f"{native}-grouped-cached"]}
                per_round = interleaved_rounds({n: (lambda c=c: bench.evaluate(c)) for n, c in eval_cfgs.items()},
                                               max(a.rounds, 5))
                result["evaluation"] = summarize(per_round, "fp32-dataset-order", bench.flops_per_token, bf16_rate,
                                                 "eval")
            print(json.dumps(result[method], indent=1), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
