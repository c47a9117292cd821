"""Decoder-only transformers whose attention is a configuration choice.

This package imports only torch: no Lightning, Hydra or W&B.
"""

from models.config import AttentionConfig, AttentionName, GPTConfig
from models.gpt import GPT
from models.probe import LogitTerm, QKFactors

__all__ = ["GPT", "AttentionConfig", "AttentionName", "GPTConfig", "LogitTerm", "QKFactors"]
