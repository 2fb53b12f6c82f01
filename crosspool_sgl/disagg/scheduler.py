"""The scheduler in disaggregated mode: the colocated one, plus what to do when the FFN side dies.

A dead or silent FFN worker surfaces as `FFNWorkerError` from the runner. Every
waiting and running request is then finished with an abort reason whose
status code is 503 (the server answers 503 with the message) and so is every
later request: the engine never hangs on a worker that is gone.
"""

from __future__ import annotations

import logging

from crosspool_sgl.core.req import ReqOutput
from crosspool_sgl.core.scheduler import MultiModelScheduler
from crosspool_sgl.disagg.remote_ffn import FFNWorkerError

logger = logging.getLogger(__name__)


class DisaggScheduler(MultiModelScheduler):
    """MultiModelScheduler whose runner is a PipelinedModelRunner (it has `.ffn`)."""

    def step(self) -> list[ReqOutput]:
        if self.runner.ffn.failure is None:
            try:
                return super().step()
            except FFNWorkerError:
                logger.exception("step failed: the FFN side is down")
        self._abort_all(self.runner.ffn.failure or "the FFN side is down")
        out, self._outputs = self._outputs, []
        return out

    def _abort_all(self, failure: str) -> None:
        reason = {
            "type": "abort",
            "message": f"{failure}; this server cannot run FFN layers until it is restarted",
            "status_code": 503,
        }
        for req in list(self.running) + list(self.waiting):
            self._finish(req, dict(reason))
