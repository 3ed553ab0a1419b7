"""The saved models `python -m cap.evaluate` scores: which kind a folder is (told by its files), whether it fits a task,
loading it, and what its weights say was pruned."""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cap.errors import UserError

KINDS = {  # kind -> what it is, as the error for a folder of no kind lists them
    "checkpoint": "a Hugging Face checkpoint (config.json + model.safetensors)",
    "cap_f_stage": "a CAP-f stage (stages/<sparsity>/: model/ + masks.safetensors)",
    "export": "a structured export (export/<sparsity>/, cap_export.json)",
    "sparse": "a compact sparse checkpoint (sparse/, sparse.safetensors)",
    "onnx": "an ONNX file of an export (export/<sparsity>/model.onnx, model.int8.onnx)",
    "run": "a run dir (model/, stages/, metrics.json)",
}
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
HEADS = {"ForSequenceClassification": "sequence-classification", "ForQuestionAnswering": "question-answering"}


@dataclass(frozen=True)
class Artifact:
    path: Path                    # what is scored: the checkpoint, stage, export or sparse folder
    kind: str                     # a key of KINDS other than "run"
    files: Path                   # the folder holding its config.json and tokenizer (a stage's model/)
    run_config: Path | None       # the config of the run it belongs to (.hydra/config.yaml), if any
    note: str = ""                # how a run dir was resolved to one of its models


def kind_of(folder: Path) -> str | None:
    if (folder / "cap_export.json").is_file():
        return "export"
    if (folder / "sparse.safetensors").is_file():
        return "sparse"
    if (folder / "masks.safetensors").is_file() and (folder / "model" / "config.json").is_file():
        return "cap_f_stage"
    if (folder / "config.json").is_file() and any((folder / w).is_file() for w in WEIGHTS):
        return "checkpoint"
    return None


def _is_run(folder: Path) -> bool:
    return (folder / "stages").is_dir() or ((folder / "model").is_dir() and (
        (folder / "metrics.json").is_file() or (folder / ".hydra").is_dir()))


def _finished_stages(run: Path) -> list[str]:
    stages = run / "stages"
    found = [p.name for p in stages.iterdir() if (p / "DONE").is_file()] if stages.is_dir() else []
    return sorted(found, key=float)


def run_config(path: Path) -> Path | None:
    """The config of the run `path` is (or is inside: model/, stages/<s>/, export/<s>/, sparse/): a folder at most
    three levels up holding .hydra/config.yaml, or config.yaml beside metrics.json (results/ folders)."""
    for folder in [path, *path.parents][:4]:
        if (folder / ".hydra" / "config.yaml").is_file():
            return folder / ".hydra" / "config.yaml"
        if (folder / "config.yaml").is_file() and (folder / "metrics.json").is_file():
            return folder / "config.yaml"
    return None


def _expected() -> str:
    kinds = list(KINDS.values())
    return f"expected {', '.join(kinds[:-1])} or {kinds[-1]}"


def find_artifact(path, stage: str | None = None) -> Artifact:
    """The artifact at `path`, its kind told by its files; a run dir gives its `stage` (a CAP-f stage's sparsity) or
    its final model. UserError, in one line, for anything else."""
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        if kind_of(path.parent) != "export" or stage is not None:
            raise UserError(f"{path}: score an ONNX file inside an export folder (python -m cap.export ... --onnx), "
                            "without --stage")
        return Artifact(path, "onnx", path.parent, run_config(path.parent))
    if not path.is_dir():
        raise UserError(f"{path}: {'not a folder' if path.exists() else 'no such folder'}; {_expected()}")
    kind, note = kind_of(path), ""
    if kind is None and _is_run(path):
        finished = _finished_stages(path)
        if stage is not None:
            try:
                name = f"{float(stage):g}"
            except ValueError:
                raise UserError(f"--stage {stage}: give a stage's sparsity, e.g. --stage 0.9") from None
            if name not in finished:
                raise UserError(f"{path} has no finished stage {stage}; finished stages: "
                                f"{', '.join(finished) or 'none'}")
            return Artifact(path / "stages" / name, "cap_f_stage", path / "stages" / name / "model", run_config(path),
                            f"run {path}: stage {name} (stages/{name}/)")
        if kind_of(path / "model") != "checkpoint":
            raise UserError(f"{path} is a run dir without a final model (model/) yet; finished stages: "
                            f"{', '.join(finished) or 'none'} (--stage <sparsity> scores one)")
        more = f"; --stage picks one of the stages {', '.join(finished)}" if finished else ""
        return Artifact(path / "model", "checkpoint", path / "model", run_config(path),
                        f"run {path}: its final model (model/){more}")
    if kind is None:
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "") or "nothing"
        raise UserError(f"{path} is not a model: it holds {shown}; {_expected()}")
    if stage is not None:
        raise UserError(f"--stage {stage} picks a stage of a run dir, but {path} is {KINDS[kind]}")
    files = path / "model" if kind == "cap_f_stage" else path
    return Artifact(path, kind, files, run_config(path), note)


def check_task(artifact: Artifact, spec) -> None:
    """UserError unless the artifact's head fits task `spec`: QA or classification, the task's label count and
    label names (read from config.json, before anything is loaded)."""
    config = json.loads((artifact.files / "config.json").read_text())
    arch = (config.get("architectures") or ["(no architecture)"])[0]
    where, fix = str(artifact.path), "pass the task it was trained on (task=...)"
    head = next((name for suffix, name in HEADS.items() if arch.endswith(suffix)), None)
    if head is None:
        raise UserError(f"{where} is a {arch}, without a task head: score a model fine-tuned on a task (a run's "
                        "model/, a stage, an export)")
    needs = "question-answering" if spec.is_qa else "sequence-classification"
    if head != needs:
        raise UserError(f"{where} is a {head} model ({arch}) but task {spec.name} needs a {needs} model: {fix}")
    if spec.is_qa:
        return
    id2label = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
    if len(id2label) != spec.num_labels:
        raise UserError(f"{where} predicts {len(id2label)} labels but task {spec.name} has {spec.num_labels}: {fix}")
    names = [str(id2label.get(str(i), id2label.get(i, ""))) for i in range(len(id2label))]
    generic = all(re.fullmatch(r"LABEL_\d+", n) for n in names)
    if spec.label_names and not generic and [n.lower() for n in names] != [n.lower() for n in spec.label_names]:
        raise UserError(f"{where} predicts the labels {', '.join(names)} but task {spec.name} has "
                        f"{', '.join(spec.label_names)} (in this order): {fix}")


def tokenizer_path(artifact: Artifact, given: str | None = None) -> str:
    if given:
        return given
    if any((artifact.files / name).is_file() for name in TOKENIZER_FILES):
        return str(artifact.files)
    raise UserError(f"{artifact.files} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): pass --tokenizer <the "
                    "folder or hub name of the model it was trained from>")


def load_model(artifact: Artifact):
    """The artifact's model in eval mode: exports and sparse checkpoints through their loaders, the others through
    `from_pretrained` of the class in their config (which must load completely)."""
    import transformers

    if artifact.kind == "export":
        from cap.export import load_pruned

        return load_pruned(artifact.path)
    if artifact.kind == "onnx":
        return OnnxModel(artifact.path)
    if artifact.kind == "sparse":
        from cap.sparse import load_sparse

        return load_sparse(artifact.path)
    arch = json.loads((artifact.files / "config.json").read_text())["architectures"][0]
    model_class = getattr(transformers, arch, None)
    if model_class is None:
        raise UserError(f"{artifact.files}: transformers has no model class {arch}")
    model, info = model_class.from_pretrained(artifact.files, output_loading_info=True)
    incomplete = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if incomplete:
        raise UserError(f"{artifact.files} has no trained weights for {', '.join(incomplete[:4])}: score a complete "
                        "fine-tuned model")
    return model.eval()


@functools.cache
def _onnx_model_class():
    """The class, made on first use: this module imports neither torch nor transformers before a model is loaded."""
    import torch
    from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

    class OnnxModel(torch.nn.Module):
        """An export's ONNX file run by ONNX Runtime (CPU) behind a model's forward, so that the Trainer's prediction
        loop scores it as any model; `source` is the export it was made from (what its sparsity is measured on)."""

        def __init__(self, path: Path):
            import onnxruntime

            from cap.export import load_pruned

            super().__init__()
            self.source = load_pruned(path.parent)
            self.config = self.source.config
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.outputs = [o.name for o in self.session.get_outputs()]
            self.register_buffer("anchor", torch.zeros(0), persistent=False)  # a device for the Trainer to read

        def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, start_positions=None,
                    end_positions=None, **kwargs):  # the label names tell the Trainer what to return as labels
            given = {"input_ids": input_ids,
                     "attention_mask": torch.ones_like(input_ids) if attention_mask is None else attention_mask,
                     "token_type_ids": torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids}
            got = self.session.run(self.outputs, {k: v.cpu().numpy() for k, v in given.items() if k in self.inputs})
            out = {name: torch.from_numpy(value).to(input_ids.device) for name, value in zip(self.outputs, got)}
            if "logits" in out:
                return SequenceClassifierOutput(logits=out["logits"])
            return QuestionAnsweringModelOutput(start_logits=out["start_logits"], end_logits=out["end_logits"])

    return OnnxModel


def OnnxModel(path: Path):  # noqa: N802  (an instance of the class above)
    return _onnx_model_class()(Path(path))


def measure(model) -> dict[str, float | int]:
    """What the weights say was pruned, against the dense model of the same config, in training's terms:
    `sparsity_heads` / `sparsity_ffn_neurons` (units removed, or zeroed as CAP-f folds them: a head's value rows and
    bias, a neuron's FFN-input row and bias), `sparsity_entries` (entries of the six encoder matrices per layer that
    are zero, removed or in a removed unit) and `sparsity_encoder_params` (those entries and the removed units'
    biases, over all encoder parameters); `parameters` stored and `nonzero_parameters`. The sparsities are None for
    a model without BERT-style layers."""
    import torch

    model = getattr(model, "source", model)  # an ONNX file: the export it was made from
    params = list(model.parameters())
    counts = {"parameters": sum(p.numel() for p in params),
              "nonzero_parameters": sum(int(torch.count_nonzero(p)) for p in params)}
    try:
        return {**_pruned(model), **counts}
    except (AttributeError, TypeError):  # not BERT-style: no base_model.encoder.layer, other module names
        return {key: None for key in ("sparsity_heads", "sparsity_ffn_neurons", "sparsity_entries",
                                      "sparsity_encoder_params")} | counts


def _pruned(model) -> dict[str, float]:
    import torch

    from cap.pruning.movement import prunable_linears
    from cap.pruning.structured import encoder_layers

    config = model.config
    # the dense model of the same config: the stock class an export's PrunedBert class derives from
    stock = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers."))
    with torch.device("meta"):
        dense = stock(config)
    n_layers, n_heads, n_neurons = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    head_size = config.hidden_size // n_heads
    dense_entries = sum(linear.weight.numel() for _, linear in prunable_linears(dense))
    dense_encoder = sum(p.numel() for p in dense.base_model.encoder.parameters())

    def live_rows(linear, units: int, size: int):
        """[units] whether a unit (`size` consecutive rows of `linear`) has a nonzero weight or bias."""
        live = (linear.weight.view(units, size, -1) != 0).flatten(1).any(1)
        return live | (linear.bias.view(units, size) != 0).any(1) if linear.bias is not None else live

    def nonzero(t) -> int:
        return int(torch.count_nonzero(t))

    live_heads = live_neurons = kept_entries = 0
    with torch.no_grad():
        for layer in encoder_layers(model):
            attention = layer.attention.self
            if hasattr(attention, "value"):  # cap.export's NoHeads (a layer without heads) has none
                n, d = attention.num_attention_heads, attention.attention_head_size
                heads = live_rows(attention.value, n, d)
                live_heads += int(heads.sum())
                for linear in (attention.query, attention.key, attention.value):
                    kept_entries += nonzero(linear.weight.view(n, d, -1)[heads])
                out = layer.attention.output.dense.weight
                kept_entries += nonzero(out.view(out.size(0), n, d)[:, heads])
            neurons = live_rows(layer.intermediate.dense, layer.intermediate.dense.out_features, 1)
            live_neurons += int(neurons.sum())
            kept_entries += nonzero(layer.intermediate.dense.weight[neurons])
            kept_entries += nonzero(layer.output.dense.weight[:, neurons])
    dead_heads, dead_neurons = n_layers * n_heads - live_heads, n_layers * n_neurons - live_neurons
    removed_entries = dense_entries - kept_entries
    removed = removed_entries + dead_heads * 3 * head_size + dead_neurons  # + their Q/K/V and FFN-input biases
    return {"sparsity_heads": round(dead_heads / (n_layers * n_heads), 6),
            "sparsity_ffn_neurons": round(dead_neurons / (n_layers * n_neurons), 6),
            "sparsity_entries": round(removed_entries / dense_entries, 6),
            "sparsity_encoder_params": round(removed / dense_encoder, 6)}
