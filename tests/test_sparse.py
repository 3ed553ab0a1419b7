"""Compact sparse checkpoints round-trip exactly and are small."""
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification

from cap.sparse import encoder_sparsity, load_sparse, save_sparse


def pruned(cls, fraction=0.9):
    torch.manual_seed(0)
    model = cls(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64)).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for linear in (layer.attention.self.query, layer.attention.output.dense, layer.intermediate.dense,
                           layer.output.dense):
                linear.weight[torch.rand_like(linear.weight) < fraction] = 0
    return model


def test_round_trip_is_bit_exact_and_smaller(tmp_path):
    for cls in (BertForSequenceClassification, BertForQuestionAnswering):
        model = pruned(cls)
        model.save_pretrained(tmp_path / "dense")
        save_sparse(model, tmp_path / "sparse")
        loaded = load_sparse(tmp_path / "sparse")
        assert type(loaded) is cls
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, loaded.state_dict()[name]), name
        assert (tmp_path / "sparse" / "sparse.safetensors").stat().st_size < \
            (tmp_path / "dense" / "model.safetensors").stat().st_size
        assert {p.suffix for p in (tmp_path / "sparse").iterdir()} <= {".json", ".safetensors"}


def test_dense_model_round_trips_and_sparsity_is_measured(tmp_path):
    model = pruned(BertForSequenceClassification, fraction=0.0)
    loaded = load_sparse(save_sparse(model, tmp_path))
    ids = torch.randint(5, 100, (2, 5))
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert encoder_sparsity(pruned(BertForSequenceClassification))["matrix_sparsity"] > 0.5
