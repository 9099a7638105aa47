"""SIGINT, SIGTERM and SIGHUP as a request to end a live trace cleanly (drain, summarise,
close the recording), checked by the loop between polls: the trace's and `top`'s."""
from __future__ import annotations

import signal


class StopRequest:
    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handler)

    def _handler(self, _signum, _frame):
        self.requested = True
