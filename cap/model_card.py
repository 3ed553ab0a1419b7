"""The model card (`README.md`, with the Hugging Face Hub's front matter) written into every saved model folder: a
fine-tuned model, a CAP-f stage (and so the run's final `model/`), a movement run's `model/`, `sparse/` and
`export/`. It says what the model is (method, task, base model), how pruned (both sparsity definitions, spec Q13),
how good at that point (the dev rows of its stage), the config it came from, and how to load it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from cap.data import get_task

METHODS = {"finetune": "dense fine-tuning (the teacher / dense reference)",
           "cap_f": "CAP-f: structured pruning of attention heads and FFN neurons by first-order importance, with "
                    "contrastive terms (Xu et al., AAAI 2022)",
           "cap_m": "CAP-m: unstructured movement pruning (Top-K) with contrastive terms (Xu et al., AAAI 2022)",
           "cap_soft": "CAP-soft: soft movement pruning (threshold and regularisation) with contrastive terms "
                       "(Xu et al., AAAI 2022)"}
KNOWN_BASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
LOADERS = {  # folder kind -> how to load it
    "checkpoint": "from transformers import {auto}\nmodel = {auto}.from_pretrained(\"{path}\")",
    "export": "from transformers import {auto}\n# the folder carries its modeling code (per-layer head and FFN sizes)\n"
              "model = {auto}.from_pretrained(\"{path}\", trust_remote_code=True)",
    "sparse": "from cap.sparse import load_sparse  # needs cap installed\nmodel = load_sparse(\"{path}\")",
}
ONNX = ("import onnxruntime\nsession = onnxruntime.InferenceSession(\"{path}/{file}\")\n"
        "logits = session.run(None, {{\"input_ids\": ids, \"attention_mask\": mask, \"token_type_ids\": types}})")


@dataclass(frozen=True)
class CardSettings:
    """What every card of a run says about it: its task, method and base model, and its whole config as YAML."""
    task: str
    method: str
    base: str
    config_yaml: str

    @classmethod
    def from_config(cls, cfg: DictConfig) -> CardSettings:
        name = str(cfg.model.name_or_path)
        return cls(task=cfg.task.name, method=cfg.method.name, base=KNOWN_BASES.get(name, name),
                   config_yaml=OmegaConf.to_yaml(cfg).strip())


def write_card(folder, card: CardSettings, rows: list[dict], kind: str = "checkpoint") -> Path:
    """Write `folder/README.md` for a model of the run `card` describes, evaluated as `rows` (its stage's metrics
    rows); `kind` is checkpoint, export or sparse (how it loads)."""
    folder = Path(folder)
    spec = get_task(card.task)
    method, base = card.method, card.base
    metrics = {k: v for row in rows for k, v in row.items()
               if isinstance(v, float) and k not in ("sparsity",) and not k.startswith("sparsity_")}
    sparsities = {k: v for row in rows[:1] for k, v in row.items() if k == "sparsity" or k.startswith("sparsity_")}
    split = rows[0].get("split", "validation") if rows else "validation"
    dataset = "squad" if spec.is_qa else "glue"
    front = {
        "base_model": base, "library_name": "transformers", "datasets": [dataset],
        "pipeline_tag": "question-answering" if spec.is_qa else "text-classification",
        "tags": ["pruning", "contrastive-pruning", "cap", method.replace("_", "-")],
        "model-index": [{"name": f"{spec.name}-{method}" + (f"-{sparsities['sparsity']:g}" if sparsities else ""),
                         "results": [{
            "task": {"type": "question-answering" if spec.is_qa else "text-classification"},
            "dataset": {"name": spec.name, "type": dataset, **({} if spec.is_qa else {"config": spec.name}),
                        "split": split},
            "metrics": [{"type": name, "value": round(value, 6)} for name, value in metrics.items()]}]}],
    }
    auto = "AutoModelForQuestionAnswering" if spec.is_qa else "AutoModelForSequenceClassification"
    here = "path/to/this/folder"  # where the folder ends up: a local path, or a Hub repo id for from_pretrained
    loading = [LOADERS[kind].format(auto=auto, path=here)]
    loading += [ONNX.format(path=here, file=f.name) for f in sorted(folder.glob("*.onnx"))]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {spec.name} / {method}" + (f" at {sparsities['sparsity']:g} sparsity" if "sparsity" in sparsities
                                              and sparsities["sparsity"] else ""), "",
             f"**Method**: {METHODS.get(method, method)}; made with `cap` from `{base}`.", "",
             "**Sparsity** (spec Q13: the fraction of units or of encoder weight entries pruned, and of encoder "
             "parameters removed):", ""]
    lines += [f"- `{k}`: {v}" for k, v in sparsities.items()] or ["- none (dense)"]
    lines += ["", f"**Evaluation** on {spec.name} `{split}` at this stage:", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in metrics.items()] or ["- not evaluated"]
    lines += ["", "**Loading**:", "", "```python", *"\n\n".join(loading).splitlines(), "```", "",
              "**Config** it came from (`python -m cap` with these values):", "", "```yaml",
              card.config_yaml, "```", ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path
