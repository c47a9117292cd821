"""Known console noise, silenced where it comes from; nothing else is filtered.

Each filter names the one message and the module that emits it, so a new warning from the same
library still shows:

- Lightning's `_pytree` helper calls torch's deprecated `isinstance(treespec, LeafSpec)` on every
  fit (torch >= 2.10 warns; Lightning 2.6 has not caught up);
- Lightning's tip advertising its LitLogger service, logged by every Trainer without one.

W&B's "anonymous setting has no effect" warning and Lightning's `limit_val_batches=1.0` note are
not filtered: their causes are gone (trainer.loggers does not pass `anonymous`; the config leaves
`limit_val_batches` unset).
"""

import logging
import warnings

LIGHTNING_TIP = "💡 Tip: For seamless cloud logging"


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_noise() -> None:
    """Install the filters above (idempotent: each is added once per process)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        rank_zero = logging.getLogger(name)  # rank_zero_info logs through whichever module set it last
        if not any(isinstance(f, _DropPrefix) and f.prefix == LIGHTNING_TIP for f in rank_zero.filters):
            rank_zero.addFilter(_DropPrefix(LIGHTNING_TIP))
