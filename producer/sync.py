""":class:`SyncJobProducer`: publishing jobs from code without an event loop (a Django
view, a Celery task, a script). It runs one :class:`~producer.jobs.JobProducer` on a
private event loop in a daemon thread; every call blocks until the broker has
acknowledged (or ``timeout_s`` passes) and is safe from several threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from producer.jobs import JobProducer
from pushfan.settings import KafkaSettings
from schemas import NotificationJob

T = TypeVar("T")


class SyncJobProducer:
    """Use as ``with SyncJobProducer(settings) as p: p.publish(job)``."""

    def __init__(self, settings: KafkaSettings, *, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pushfan-producer", daemon=True
        )
        self._thread.start()
        self._inner = JobProducer(settings)
        try:
            self._call(self._inner.start())
        except BaseException:
            self._shutdown()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.timeout_s)

    def publish(self, job: NotificationJob | Mapping[str, Any]) -> str:
        """See :meth:`JobProducer.publish`."""
        return self._call(self._inner.publish(job))

    def publish_many(self, jobs: Iterable[NotificationJob | Mapping[str, Any]]) -> list[str]:
        """See :meth:`JobProducer.publish_many`."""
        return self._call(self._inner.publish_many(list(jobs)))

    def close(self) -> None:
        """Flush, disconnect, stop the thread."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._inner.stop())
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout_s)
        self._loop.close()

    def __enter__(self) -> SyncJobProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
