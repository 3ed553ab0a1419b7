"""What an exported model carries so that it loads without `cap`: `modeling_pruned_bert.py`."""
