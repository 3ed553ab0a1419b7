"""Contrastive Pruning (CAP) of BERT models. Importing `cap` registers the config schema (cap/config.py)."""
from cap import config  # noqa: F401
