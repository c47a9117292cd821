"""Decoder-only transformers whose attention is a configuration choice.

models/gpt.py is the standard model (MHA/GQA) in one file; models/mla.py (the MLA family) and
models/kv_shift.py (KV shifting) register their attention classes in `models.gpt.ATTENTION`,
which importing this package does. This package imports only torch: no Lightning, Hydra or W&B.
"""

from models import kv_shift, mla  # noqa: F401  (register the MLA and KV-shifting variants)
from models.config import AttentionConfig, AttentionName, GPTConfig
from models.gpt import ATTENTION, GPT
from models.probe import LogitTerm, QKFactors

__all__ = ["ATTENTION", "GPT", "AttentionConfig", "AttentionName", "GPTConfig", "LogitTerm", "QKFactors"]
