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
    assert loaded.config.heads_per_layer == [0, int(head_mask[1].sum()), int(head_mask[2].sum())]
    assert loaded.config.ffn_neurons_per_layer == ffn_mask.sum(1).int().tolist()
    with torch.no_grad():
        assert (outputs(loaded, ids) - expected).abs().max() <= 1e-4
    assert torch.equal(head_mask, masks.head_mask.cpu())  # the model exported is left as it was
    assert sum(p.numel() for p in model.parameters()) == before


NO_CAP = """
import json, sys
sys.modules["cap"] = None  # `import cap` fails here, whatever is installed
import torch
import transformers
folder, kind = sys.argv[1], sys.argv[2]
auto = getattr(transformers, kind)
model = auto.from_pretrained(folder, trust_remote_code=True).eval()
assert "cap" not in type(model).__module__.split(".")[0], type(model).__module__
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
print(json.dumps(torch.cat([v.flatten() for k, v in out.items() if k.endswith("logits")]).tolist()))
"""


@pytest.mark.slow
@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
def test_an_export_loads_with_stock_transformers_where_cap_is_not_installed(cls, tmp_path):
    import json
    import os
    import subprocess
    import sys

    model = tiny(cls)
    head_mask, ffn_mask = random_masks()
    export_pruned(model, head_mask, ffn_mask, tmp_path / "export")
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = outputs(load_pruned(tmp_path / "export"), ids)
    kind = "AutoModelForSequenceClassification" if cls is BertForSequenceClassification else \
        "AutoModelForQuestionAnswering"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1",
                                                                         "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", NO_CAP, str(tmp_path / "export"), kind, json.dumps(ids.tolist())],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    assert (got - expected).abs().max() <= 1e-5
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "modeling_pruned_bert.PrunedBertConfig"
    assert (tmp_path / "export" / "modeling_pruned_bert.py").is_file()


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


@pytest.mark.slow
@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForQuestionAnswering])
def test_onnx_and_int8_exports_agree_with_pytorch(cls, tmp_path):
    """model.onnx (dynamic batch and length; a layer without heads and one without FFN neurons) runs in ONNX Runtime
    as the PyTorch export does; the int8 copy close to it."""
    import json

    import onnxruntime

    from cap.export import ONNX_TOLERANCE, export_onnx

    export_pruned(tiny(cls), *random_masks(), tmp_path)
    diffs = export_onnx(tmp_path, quantize=True)
    assert diffs["model.onnx"] <= ONNX_TOLERANCE
    ids = torch.randint(5, 200, (3, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        scale = outputs(load_pruned(tmp_path), ids).abs().max().item()
    assert diffs["model.int8.onnx"] < 0.1 * scale  # int8 weights: close, not equal
    assert json.loads((tmp_path / "cap_export.json").read_text())["onnx_max_abs_diff"] == diffs
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(isinstance(d, str) for i in session.get_inputs() for d in i.shape)  # batch and length: dynamic
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
