"""`Timings`: depeche-db 0.14's opt-in named-span timer, as `projector.timings`."""

from __future__ import annotations

import contextlib as _contextlib
import time as _time
from collections import defaultdict as _defaultdict
from collections.abc import Iterator


class Timings:
    """Opt-in wall-clock timing of named spans.

    Disabled by default, when `span` costs next to nothing. Enabled
    (`projector.timings.enabled = True`), every `with timings.span(name):` appends its
    duration in seconds to `samples[name]`. The projector records `update_full`,
    `update_batch` and `resolve`: Python's part of a batch (decoding message bodies and
    running the partitioner), needed only for a custom partitioner or for messages
    written without a message time (by depeche-db); the rest runs in the Rust engine.
    """

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.samples: dict[str, list[float]] = _defaultdict(list)

    @_contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time the block as one sample of `name` (when enabled)."""
        if not self.enabled:
            yield
            return
        start = _time.perf_counter()
        try:
            yield
        finally:
            self.samples[name].append(_time.perf_counter() - start)

    def reset(self) -> None:
        """Forget every sample."""
        self.samples = _defaultdict(list)
