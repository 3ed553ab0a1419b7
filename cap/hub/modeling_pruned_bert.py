"""A BERT whose layers each keep their own number of attention heads and FFN neurons: the model of a structured
export (`python -m cap.export`). This file is copied into every export folder and named in its config's `auto_map`,
so the folder loads with stock transformers and nothing of `cap` installed:

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

It needs torch and transformers only. The config adds two keys to BERT's: `heads_per_layer` (attention heads kept
in each layer; 0 leaves the layer without self-attention: its attention block adds only the output bias) and
`ffn_neurons_per_layer` (FFN neurons kept in each layer). The modules are the stock BERT ones, built at those sizes.
"""
from __future__ import annotations

import warnings

from torch import nn
from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertModel


class PrunedBertConfig(BertConfig):
    model_type = "pruned_bert"

    def __init__(self, heads_per_layer: list[int] | None = None, ffn_neurons_per_layer: list[int] | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        layers = self.num_hidden_layers
        self.heads_per_layer = list(heads_per_layer or [self.num_attention_heads] * layers)
        self.ffn_neurons_per_layer = list(ffn_neurons_per_layer or [self.intermediate_size] * layers)
        if len(self.heads_per_layer) != layers or len(self.ffn_neurons_per_layer) != layers:
            raise ValueError(f"heads_per_layer and ffn_neurons_per_layer need one entry per layer ({layers})")


class NoHeads(nn.Module):
    """The self-attention of a layer whose heads were all pruned: an empty context [B, T, 0]."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _resize(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """A Linear like `linear` with other sizes (its weights are loaded afterwards). nn.Linear(0, n) outputs its bias."""
    in_features = linear.in_features if in_features is None else in_features
    with warnings.catch_warnings():  # Linear(0, n): torch warns that initialising its empty weight does nothing
        warnings.simplefilter("ignore", UserWarning)
        return nn.Linear(in_features, linear.out_features if out_features is None else out_features,
                         bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)


def build_pruned_layers(model: nn.Module, heads_per_layer: list[int], ffn_neurons_per_layer: list[int]) -> None:
    """Give every encoder layer of a stock BERT model its kept heads and FFN neurons (the layers' sizes only)."""
    for layer, heads, neurons in zip(model.base_model.encoder.layer, heads_per_layer, ffn_neurons_per_layer):
        attention = layer.attention.self
        width = heads * attention.attention_head_size
        if heads:
            for name in ("query", "key", "value"):
                setattr(attention, name, _resize(getattr(attention, name), out_features=width))
            attention.num_attention_heads, attention.all_head_size = heads, width
        else:
            layer.attention.self = NoHeads()
        output = layer.attention.output
        output.dense = _resize(output.dense, in_features=width)
        layer.intermediate.dense = _resize(layer.intermediate.dense, out_features=neurons)
        layer.output.dense = _resize(layer.output.dense, in_features=neurons)


class PrunedBertModel(BertModel):
    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        build_pruned_layers(self, config.heads_per_layer, config.ffn_neurons_per_layer)


class PrunedBertForSequenceClassification(BertForSequenceClassification):
    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig):
        super().__init__(config)
        build_pruned_layers(self, config.heads_per_layer, config.ffn_neurons_per_layer)


class PrunedBertForQuestionAnswering(BertForQuestionAnswering):
    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig):
        super().__init__(config)
        build_pruned_layers(self, config.heads_per_layer, config.ffn_neurons_per_layer)


PrunedBertConfig.register_for_auto_class()
PrunedBertModel.register_for_auto_class("AutoModel")
PrunedBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
PrunedBertForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")
__all__ = ["PrunedBertConfig", "PrunedBertModel", "PrunedBertForSequenceClassification", "PrunedBertForQuestionAnswering",
           "NoHeads", "build_pruned_layers"]
