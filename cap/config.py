"""The config's schema: one dataclass per node, each key with its type and a one-line doc.

The values live in conf/ (the paper's settings, with the spec's reasons beside them); this file says what each key
is. Hydra validates every composition against it (conf/config.yaml's defaults start with `cap_schema`), so a
misspelled key or a value of the wrong type fails before anything runs; `python -m cap --help` prints these docs.
`prune` and `logger` change shape with the method and the logger: their YAML files pick their schema in their own
defaults list (`/cap_f_prune@prune`, `/wandb_logger@_here_`, ...).

Importing this module registers the schemas in Hydra's ConfigStore and the resolver `cap.dirname` (run-dir names
a shell takes unquoted). What the command line says about a config (one-line errors, the keys of `--help`) is
cap/cli.py's.
"""
import dataclasses
import re
import string
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


def doc(help: str, default: Any = MISSING) -> Any:
    """A field whose value comes from conf/ (or `default`, for a node some compositions lack)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TaskConfig:
    name: str = doc("the GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or squad; set by task=...")
    max_seq_length: int = doc("the task's default for data.max_seq_length")
    eval_split: Any = doc("the task's evaluation split(s), the default of data.eval_split")


@dataclass
class ModelConfig:
    name_or_path: str = doc("the student: a hub name, a local checkpoint, or minilm (the embedded all-MiniLM-L6-v2)")


@dataclass
class DataConfig:
    dir: Optional[str] = doc("local copy (glue/<TASK>/, squad/), default $CAP_DATA_DIR; null: the Hugging Face hub")
    train_split: str = doc("the split trained on")
    eval_split: Any = doc("a split name or a list of them (default: the task's); offline MNLI/QQP have only heldout")
    max_train_samples: Optional[int] = doc("deterministic subsample (seeded), idx renumbered 0..n-1; null: all")
    seed: int = doc("the subsample's seed (default: seed): pin it to vary only the training seed")
    max_eval_samples: Optional[int] = doc("deterministic subsample of each eval split (seeded); null: all")
    validation_from_train: Optional[float] = doc("hold out this fraction (<1) or count of training rows (seeded by "
                                                 "data.seed) as the eval split trainval; null: none")
    max_seq_length: int = doc("tokens per example (per window for SQuAD); longer texts are truncated")
    doc_stride: int = doc("SQuAD: tokens shared by consecutive windows of a long context")
    max_query_length: int = doc("SQuAD: questions are cut to this many tokens")
    cache_dir: Optional[str] = doc("tokenised datasets, default $CAP_CACHE_DIR; null: the datasets library's cache")
    group_by_length: bool = doc("training batches of similar length (the Trainer's length-grouped sampler, seeded "
                                "per epoch), evaluation and bank encoding sorted by length: less padding; false: "
                                "random batches, dataset order")


@dataclass
class TeacherConfig:
    path: Optional[str] = doc("a fine-tuned checkpoint for KD and the FiC bank; null: fine-tune one (and cache it)")
    cache_dir: str = doc("where fine-tuned teachers are cached, keyed by task, model, data and seed")
    epochs: int = doc("epochs of the teacher's fine-tuning (teacher.path=null)")
    lr: float = doc("learning rate of the teacher's fine-tuning (teacher.path=null)")
    seed: int = doc("the teacher's seed (default: seed): pin it to share one teacher across a sweep over seeds")
    cache_outputs: bool = doc("run the frozen teacher once over the training set and reuse its logits (KD) and "
                              "FiC vectors; false: its forward again in every update")


@dataclass
class BankConfig:
    dtype: str = doc("storage: float16 | bfloat16 | float32; losses gather and compute in float32 (spec Q21)")
    device: str = doc("cpu (pinned when a GPU is used) | cuda")
    snapshot_train_mode: bool = doc("true encodes snapshots with dropout on, as the original's CAP-m (spec Q7)")


@dataclass
class TrainerConfig:
    batch_size: int = doc("training examples per update over all processes (the global batch)")
    device_batch_size: Optional[int] = doc("examples per device per forward; null: batch_size / processes. "
                                           "Smaller: gradient accumulation makes up the global batch")
    eval_batch_size: int = doc("examples per batch in evaluation, importance and bank encoding")
    lr: float = doc("the learning rate (AdamW, linear decay to 0)")
    weight_decay: float = doc("AdamW's weight decay; not applied to biases and LayerNorm")
    epochs: int = doc("training epochs")
    max_steps: int = doc(">0: this many updates, overriding epochs; -1: epochs decide")
    warmup: float = doc("LR warm-up: a fraction of the updates (<1) or a number of updates")
    max_grad_norm: float = doc("gradients are clipped to this norm")
    precision: str = doc("auto (bf16 where the GPU or CPU runs it natively, else fp32; the run's config records "
                         "which) | fp32 | bf16 | fp16 (fp16 needs a GPU)")
    resume: bool = doc("continue from the run dir's last checkpoint; false starts over")
    logging_steps: int = doc("log the loss terms every this many updates")
    save_steps: Optional[int] = doc("a checkpoint every this many updates; null: a checkpoint every epoch")
    save_total_limit: Optional[int] = doc("checkpoints kept at once (the oldest deleted); null: all")
    num_workers: int = doc("data-loader worker processes; 0 loads in the training process")
    keep_checkpoints: bool = doc("keep the Trainer checkpoints (optimizer and scheduler state included) of finished "
                                 "stages and runs; false deletes them once a stage/run is done")


@dataclass
class ContrastConfig:
    enabled: bool = doc("false: the plain pruning baseline (no bank is built)")
    prc: bool = doc("PrC: the pre-trained model's bank")
    snc: bool = doc("SnC: snapshots of this run at earlier sparsities")
    fic: bool = doc("FiC: the fine-tuned teacher's bank")
    temperature: float = doc("τ of the contrastive loss")
    unsup_weight: float = doc("weight of the unsupervised term: same-example positives")
    sup_weight: float = doc("weight of the supervised term: same-label positives (GLUE classification only)")
    extra_examples: int = doc("extra bank items per step: min(extra_examples // R, N) items, all R vectors each")
    pooling: str = doc("cls (pooler output; raw [CLS] state for QA) | mean | auto (the checkpoint's own: its "
                       "sentence-transformers pooling, else cls)")
    normalization: str = doc("original: divide by the positive pairs in the batch (spec Q1) | per_anchor")
    reaches: str = doc("both (the paper) | weights | scores: which parameters the contrastive terms' gradients reach "
                       "(an ablation for CAP-m / CAP-soft: the other part gets task and regulariser gradients only)")


@dataclass
class MethodConfig:
    name: str = doc("the recipe: finetune | cap_f | cap_m | cap_soft; set by method=...")


@dataclass
class CEConfig:
    weight: float = doc("weight of the task loss (cross-entropy; MSE for STS-B, start/end CE for SQuAD)")


@dataclass
class KDConfig:
    weight: float = doc("weight of the distillation loss from the teacher; >0 with method=finetune needs teacher.path")
    temperature: float = doc("softmax temperature of the distillation loss")


@dataclass
class CapFPrune:
    """prune.* of method=cap_f: iterative structured pruning of heads and FFN neurons (spec §5.1)."""
    sequence: List[float] = doc("cumulative fraction of heads and of FFN neurons pruned after each step, increasing")
    retrain_epochs: int = doc("epochs of retraining after each pruning step")
    importance_fraction: float = doc("share of the training set the importance is taken over; <1: a seeded subset "
                                     "(spec Q9)")
    importance_batch_size: int = doc("batch size of the importance pass")
    normalize_by_layer: bool = doc("divide each layer's importance by its L2 norm before the global ranking")
    min_heads_per_layer: int = doc("heads every layer keeps: the best of its unpruned heads (spec Q10)")
    legacy_head_floor: bool = doc("true: the original's floor, the best heads among all, which can empty a layer "
                                  "(spec Q10)")
    min_ffn_per_layer: int = doc("FFN neurons every layer keeps (spec Q12)")


@dataclass
class MovementPrune:
    """prune.* of method=cap_m and cap_soft: movement pruning of every encoder matrix (spec §5.2-5.4)."""
    criterion: str = doc("topk (CAP-m: per-matrix Top-K of the scores) | soft (CAP-soft: sigmoid(S) > τ plus an L1 "
                         "penalty) | magnitude (per-matrix Top-K of |W| on the same schedule: the baseline)")
    score_lr: float = doc("learning rate of the scores' own optimizer group (no weight decay)")
    initial: float = doc("level at the start: the keep fraction ρ (topk) or the threshold τ (soft)")
    final: float = doc("level at the end: keep fraction (topk: 0.5 / 0.1 / 0.03 for 50 / 90 / 97 % sparsity) or τ")
    initial_warmup: int = doc("the initial level for the first initial_warmup·W updates (W: trainer.warmup)")
    final_warmup: int = doc("the final level for the last final_warmup·W updates")
    final_lambda: float = doc("L1 weight on the scores at the end (CAP-soft; λ follows τ up to it)")
    target_sparsity: Optional[float] = doc("CAP-soft: e.g. 0.9: a feedback controller adjusts λ so that the run ends "
                                           "within ±0.5 points; null: the sparsity follows from final_lambda")
    granularity: str = doc("element (one score per weight, the paper's) | structured (one per attention head and per "
                           "FFN neuron, Top-K per layer; the run is also exported physically smaller, export/)")


@dataclass
class NoLogger:
    name: str = doc("none | wandb; set by logger=...")


@dataclass
class WandbLogger:
    name: str = doc("none | wandb; set by logger=...")
    project: str = doc("the W&B project")
    entity: Optional[str] = doc("the W&B team or user; null: your default entity")
    group: Optional[str] = doc("null: in a multirun, the sweep dir's name (one group per sweep); else no group")
    tags: List[str] = doc("kept beside the tags computed from the config (cap/tracking.py run_tags)")
    log_model: bool = doc("log the run's final model (and its export or sparse checkpoint) as W&B artifacts")


@dataclass
class CAPConfig:
    seed: int = doc("the run's seed: the new head, shuffling, dropout, importance subsets, contrastive draws")
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    ce: CEConfig = field(default_factory=CEConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    prune: Any = doc("the pruning settings of method=cap_f (CapFPrune) or cap_m/cap_soft (MovementPrune); "
                     "null for finetune", default=None)
    logger: Any = doc("the tracking settings (NoLogger or WandbLogger); set by logger=...")


SCHEMAS = {"cap_schema": CAPConfig, "cap_f_prune": CapFPrune, "movement_prune": MovementPrune,
           "no_logger": NoLogger, "wandb_logger": WandbLogger}
# the nodes whose schema comes with a group option, and the option that brings each
VARIANTS = {"prune": {CapFPrune: "method=cap_f", MovementPrune: "method=cap_m or cap_soft"},
            "logger": {NoLogger: "logger=none", WandbLogger: "logger=wandb"}}


# ---------------------------------------------------------------------------------------------- run-dir names

_DIRNAME_SAFE = frozenset(string.ascii_letters + string.digits + "_-.,=/+:@")


def dirname(overrides: str) -> str:
    """Hydra's override_dirname as a folder name a shell takes unquoted: list brackets and quotes dropped
    (`prune.sequence=[0.3,0.6]` -> `prune.sequence=0.3,0.6`), every other character outside [A-Za-z0-9_-.,=/+:@]
    percent-encoded as UTF-8 bytes (a space: %20, `*`: %2A, `%`: %25), so distinct values stay distinct. Names made
    of safe characters only (`seed=1`, `data.max_train_samples=64`) are unchanged."""
    return "".join(c if c in _DIRNAME_SAFE else "".join(f"%{b:02X}" for b in c.encode())
                   for c in re.sub(r"[\[\]'\"]", "", overrides))


# ------------------------------------------------------------------------------------------- key lookup

def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Union:
        return f"{_type_name(next(a for a in typing.get_args(tp) if a is not type(None)))} or null"
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "any" if tp is Any else tp.__name__


def key_docs(schema) -> dict[str, tuple[str, str]]:
    """{key: (type, doc)} of a schema dataclass."""
    hints = typing.get_type_hints(schema)
    return {f.name: (_type_name(hints[f.name]), f.metadata.get("help", "")) for f in dataclasses.fields(schema)}


def schemas_at(path: str) -> list:
    """The schemas the node at a dotted path can have: [TrainerConfig] for `trainer`, both options' for `prune`."""
    schemas = [CAPConfig]
    for part in filter(None, path.split(".")):
        inner = [typing.get_type_hints(s).get(part) for s in schemas]
        schemas = [t for t in inner if dataclasses.is_dataclass(t)] + [
            v for s in schemas if s is CAPConfig and part in VARIANTS for v in VARIANTS[part]]
    return schemas


def lookup(full_key: str) -> tuple[str, str] | None:
    """(type, doc) of a dotted key in the schema, any option's (`prune.sequence`: CapFPrune's); None if unknown."""
    parent, _, name = re.sub(r"\[\d+\]$", "", full_key).rpartition(".")
    return next((key_docs(s)[name] for s in schemas_at(parent) if name in key_docs(s)), None)


def register() -> None:
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=name, node=schema)
    if not OmegaConf.has_resolver("cap.dirname"):
        OmegaConf.register_new_resolver("cap.dirname", dirname)


register()
