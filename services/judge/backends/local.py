"""Local backend: the judge model in-process, with a micro-batcher in front of it.

Every item (from Score, ScoreBatch, ScoreStream or Compare, from any number of clients) joins one queue; a
single loop takes everything waiting (up to `max_batch_items`) and judges it in one call of LocalScorer on
a worker thread, so concurrent requests share forward passes while the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from services.common.config import JudgeConfig
from services.judge import metrics
from services.judge.rubrics import Dimension, Rubric
from services.judge.types import BackendError, CompareItem, ItemScore, PairVerdict, ScoreItem

log = logging.getLogger("tokenmill.judge.local")


class LocalBackend:
    name = "local"
    methods = ("likelihood", "geval")

    def __init__(self, config: JudgeConfig, rubrics: list[Rubric] | None = None) -> None:
        self.config = config
        self.rubrics = rubrics or []
        self.scorer: Any = None
        self.queue: asyncio.Queue[tuple[ScoreItem | CompareItem, asyncio.Future]] | None = None
        self._loop_task: asyncio.Task | None = None
        self.max_batch_items = max(1, config.max_batch_items)
        # every torch call (load, warm-up, scoring) on one thread: GNU OpenMP keeps a thread team per calling
        # thread, and a second team makes its workers sleep between kernels (2x slower; see AsyncEngine)
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge-torch")

    @property
    def model_name(self) -> str:
        return self.config.model

    async def start(self) -> None:
        self.scorer = await asyncio.get_running_loop().run_in_executor(self._torch, self._load)
        self.queue = asyncio.Queue()
        self._loop_task = asyncio.create_task(self._run(), name="judge-batcher")

    def _load(self) -> Any:
        import torch

        from services.judge.scorer import LocalScorer
        from services.worker.engine.models.engine_model import load_model

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        t0 = time.perf_counter()
        loaded = load_model(self.config.model, self.config.quantization, self.config.device)
        scorer = LocalScorer(loaded, max_batch_tokens=self.config.max_batch_tokens)
        warm = Rubric("warmup", (Dimension("quality", "overall quality"),))
        scorer.run([ScoreItem("warmup", "Say hello.", "Hello there!", warm)])  # first pass allocates
        for rubric in self.rubrics:
            cal = rubric.calibration
            if rubric.method == "likelihood" and (cal is None or cal.model != self.config.model):
                log.warning("rubric %s: %s; its likelihood scores are not calibrated for %s (run tokenmill judge "
                            "calibrate --model %s)", rubric.name, f"calibrated for {cal.model}" if cal else
                            "no calibration", self.config.model, self.config.model)
        log.info("judge model %s ready on %s (%s, %s template) in %.1fs (pid %d)", self.config.model,
                 loaded.device, str(loaded.dtype).removeprefix("torch."), "chat" if scorer.chat else "plain",
                 time.perf_counter() - t0, os.getpid())
        return scorer

    @property
    def ready(self) -> bool:
        return self.scorer is not None and self.queue is not None

    def check(self, item: ScoreItem | CompareItem) -> None:
        """Raise InvalidRequest for an item the model cannot take (too long, unreadable scale)."""
        self.scorer.check(item)

    async def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        return await self._submit(items)

    async def compare(self, items: list[CompareItem]) -> list[PairVerdict]:
        return await self._submit(items)

    async def _submit(self, items: list[Any]) -> list[Any]:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            fut: asyncio.Future = loop.create_future()
            self.queue.put_nowait((item, fut))
            futures.append(fut)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    async def _run(self) -> None:
        assert self.queue is not None
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch_items and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # drop cancelled callers
            if not batch:
                continue
            metrics.batch_items.observe(len(batch))
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self._torch, self.scorer.run, [item for item, _ in batch])
            except Exception as exc:
                log.exception("scoring a batch of %d failed", len(batch))
                err = BackendError("INTERNAL", f"the local judge failed on this batch: {type(exc).__name__}: {exc}")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            metrics.items.labels(self.name).inc(len(batch))
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)

    async def close(self) -> None:
        self._torch.shutdown(wait=False)
        if self._loop_task is not None:
            self._loop_task.cancel()
