"""Token throughput (and MFU when the device's peak FLOP/s is known) for (x, y) token batches."""

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def _batch_size(batch: Any) -> int:
    return batch[0].size(0)


def _tokens_in_batch(batch: Any) -> int:
    return batch[0].numel()  # Throughput sums `lengths` as the items of a batch: B x T tokens


def token_throughput_monitor(window_size: int = 20) -> ThroughputMonitor:
    """Lightning's ThroughputMonitor counting tokens as items: logs items_per_sec = tokens/s."""
    return ThroughputMonitor(batch_size_fn=_batch_size, length_fn=_tokens_in_batch, window_size=window_size)
