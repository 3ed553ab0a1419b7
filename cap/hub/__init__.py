"""What an exported model carries so that it loads without `cap`: `modeling_pruned_bert.py`. Importing this package
registers its classes with transformers' Auto classes, so that `cap` itself reads an export's config (its tokenizer,
`AutoConfig`) without `trust_remote_code`."""
from transformers import AutoConfig, AutoModel, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

from cap.hub.modeling_pruned_bert import (PrunedBertConfig, PrunedBertForQuestionAnswering,
                                          PrunedBertForSequenceClassification, PrunedBertModel)

AutoConfig.register(PrunedBertConfig.model_type, PrunedBertConfig, exist_ok=True)
AutoModel.register(PrunedBertConfig, PrunedBertModel, exist_ok=True)
AutoModelForSequenceClassification.register(PrunedBertConfig, PrunedBertForSequenceClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(PrunedBertConfig, PrunedBertForQuestionAnswering, exist_ok=True)
