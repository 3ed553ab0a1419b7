"""Shared fixtures: real data slices from ../shared/data and tiny BERT models built from a BertConfig."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("CAP_DATA_DIR") or REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "glue").is_dir():
        pytest.skip(f"no GLUE data at {path}; set CAP_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from cap.models import resolve_model_path

    return Path(resolve_model_path("minilm"))


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer, 4-head, hidden-32 BERT with MiniLM's vocabulary and tokenizer, saved as a local checkpoint."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=512,
    )
    out = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(minilm_path)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sst2_teacher_dir(tmp_path_factory, tiny_model_dir, data_dir) -> Path:
    """A tiny teacher fine-tuned for two steps on an SST-2 slice (KD and the FiC bank of the pruning tests)."""
    from cap.recipes import run
    from helpers import composed, tiny_overrides

    out = tmp_path_factory.mktemp("teacher")
    run(composed(tiny_overrides(tiny_model_dir, "sst2")), out)
    return out / "model"
