"""The server decodes with the project's one decode loop, ``mmm.generation.StepDecoder``: rows
join a running batch (``merge``), leave it (``keep``), sample with their own settings and may start
from a reused KV prefix (``Past``, found by ``serve.prefix_cache``)."""

from mmm.generation import Past, StepDecoder, sample_row

__all__ = ["Past", "StepDecoder", "sample_row"]
