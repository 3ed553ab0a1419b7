"""Structured export: the smaller model predicts what the masked one did."""
import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification

from cap.export import export_pruned, load_pruned, main
from cap.pruning import StructuredMasks


def tiny(cls, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, initializer_range=0.2,
                        num_labels=2 if cls is BertForQuestionAnswering else 3)
    return cls(config).eval()


def random_masks(seed=1):
    g = torch.Generator().manual_seed(seed)
    head_mask = (torch.rand(3, 4, generator=g) > 0.5).float()
    ffn_mask = (torch.rand(3, 64, generator=g) > 0.6).float()
    head_mask[0] = 0  # a layer without heads
    head_mask[1, 0] = 1
    ffn_mask[2] = 0   # a layer without FFN neurons
    return head_mask, ffn_mask


def outputs(model, ids):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return torch.cat([v.flatten() for k, v in out.items() if k.endswith("logits")])


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
def test_exported_model_matches_the_masked_model(cls, tmp_path):
    model = tiny(cls)
    head_mask, ffn_mask = random_masks()
    ids = torch.randint(5, 200, (3, 12), generator=torch.Generator().manual_seed(2))
    masks = StructuredMasks(head_mask.clone(), ffn_mask.clone()).apply(model)
    with torch.no_grad():
        expected = outputs(model, ids)
    masks.remove()
    before = sum(p.numel() for p in model.parameters())
    export_pruned(model, head_mask, ffn_mask, tmp_path)
    loaded = load_pruned(tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) < before
    assert loaded.config.cap_pruned_heads == [0, int(head_mask[1].sum()), int(head_mask[2].sum())]
    with torch.no_grad():
        assert (outputs(loaded, ids) - expected).abs().max() <= 1e-4


def test_cli_exports_a_stage_and_names_the_finished_ones(tmp_path, capsys):
    model = tiny(BertForSequenceClassification)
    head_mask, ffn_mask = random_masks()
    stage = tmp_path / "stages" / "0.5"
    model.save_pretrained(stage / "model")
    save_file({"head_mask": head_mask, "ffn_mask": ffn_mask}, str(stage / "masks.safetensors"))
    (stage / "DONE").write_text('{"rows": []}')  # a finished stage
    out = main([str(tmp_path), "--stage", "0.50"])
    assert out == tmp_path / "export" / "0.5" and (out / "cap_export.json").exists()
    with pytest.raises(SystemExit, match="finished stages: 0.5"):
        main([str(tmp_path), "--stage", "0.9"])


def test_a_folded_model_exports_to_the_same_weights(tmp_path):
    """CAP-f saves its stages folded (masked rows zeroed): the export drops those rows, so nothing changes."""
    head_mask, ffn_mask = random_masks()
    plain, folded = tiny(BertForSequenceClassification), tiny(BertForSequenceClassification)
    assert any(t.abs().sum() > 0 for t in StructuredMasks(head_mask, ffn_mask).fold(folded).values())
    for model, out in ((plain, tmp_path / "plain"), (folded, tmp_path / "folded")):
        export_pruned(model, head_mask, ffn_mask, out)
    expected = load_pruned(tmp_path / "plain").state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in load_pruned(tmp_path / "folded").state_dict().items())
