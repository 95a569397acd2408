"""Hot reload: poll the bundle's three files; when a promotion has replaced them, load the new
bundle in a worker thread and swap it in between two batches.

The nightly's promotion (`gru4rec.eval.promote`) renames the sidecar, the evaluation graph and the
serving graph into place one after another, so a poll can see a half-replaced bundle:
`load_bundle` refuses it (export ids differ) and the old model keeps serving until the files
change again. Requests are never paused: the old model serves while the new one loads, and a
batch already running finishes on the model it started with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gru4rec.errors import UserError
from gru4rec.serve.batcher import ModelHolder
from gru4rec.serve.model import ServedModel, bundle_fingerprint

log = logging.getLogger("gru4rec.serve")


class Reloader:
    def __init__(
        self,
        path,
        models: ModelHolder,
        load: Callable[[], ServedModel],
        interval: float,
        on_reload: Callable[[ServedModel | None, str], None],
    ):
        self.path, self.models, self.load, self.interval = path, models, load, interval
        self.on_reload = on_reload  # (new model or None, 'ok' | 'failed')
        self._failed: tuple | None = None  # fingerprint that failed to load: retried once it changes

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check()

    async def check(self) -> bool:
        """Reload if the files changed since the model in use was loaded; True if it was swapped."""
        fp = bundle_fingerprint(self.path)
        if fp == self.models.current.fingerprint or fp == self._failed or None in fp:
            return False
        try:
            model = await asyncio.to_thread(self.load)
        except UserError as e:
            self._failed = fp
            log.warning(
                "reload of %s failed, still serving export %s: %s",
                self.path,
                self.models.current.export_id,
                e,
            )
            self.on_reload(None, "failed")
            return False
        old = self.models.current.export_id
        self.models.current = model
        self._failed = None
        log.warning("reloaded %s: export %s -> %s", self.path, old, model.export_id)
        self.on_reload(model, "ok")
        return True
