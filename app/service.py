"""What a running service holds, and how its model is brought up."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from service_core import Unlearner, load_dataset
from service_core.lifecycle import Identity

from .core.config import Settings
from .deletion_log import DeletionLog
from .metrics import Metrics
from .queue import JobQueue
from .worker import Worker

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServiceState:
    """The state of one app instance, reached by routes through ``app.api.deps``."""

    settings: Settings
    metrics: Metrics
    unlearner: Unlearner | None = None
    queue: JobQueue | None = None
    worker: Worker | None = None
    follower: ModelFollower | None = None


def load_model(settings: Settings) -> Unlearner:
    """The newest checkpoint in the data dir; if there is none, a model built, trained, saved.

    Restoring never retrains: a restart serves exactly the version that was checkpointed.
    """
    started = time.perf_counter()
    expect = Identity.of(
        settings.to_model_config(), settings.to_train_config(), settings.dataset_source()
    )
    u = Unlearner.restore(settings.checkpoint_dir, cache_dir=settings.ntk_cache_dir, expect=expect)
    if u is not None:
        log.info(
            "restored model version %d (n_train=%d, n_forgotten=%d) from %s in %.2f s",
            u.version,
            u.n_train,
            u.n_forgotten,
            settings.checkpoint_dir,
            time.perf_counter() - started,
        )
        return u
    log.info("no checkpoint in %s: building the model", settings.checkpoint_dir)
    dataset = load_dataset(settings.dataset, seed=settings.seed, **settings.dataset_kwargs())
    log.info(
        "loaded data set %s: %d points of shape %s in %.2f s",
        settings.dataset,
        dataset.n,
        dataset.input_shape,
        time.perf_counter() - started,
    )
    u = Unlearner.build(
        dataset,
        settings.to_model_config(),
        settings.to_train_config(),
        settings.to_solver_config(),
        cache_dir=settings.ntk_cache_dir,
        progress=True,
        source=settings.dataset_source(),
    )
    built = time.perf_counter()
    log.info("built and trained the model in %.2f s", built - started)
    u.save(settings.checkpoint_dir)
    log.info("saved version %d in %.2f s", u.version, time.perf_counter() - built)
    return u


def make_worker(
    settings: Settings, u: Unlearner, queue: JobQueue, metrics: Metrics | None
) -> Worker:
    """A worker applying jobs to ``u``, checkpointing and logging in the data dir."""
    return Worker(
        u, queue, settings.checkpoint_dir, DeletionLog(settings.deletion_log), metrics=metrics
    )


class ModelFollower:
    """Keeps an API process without a worker (``serve --no-worker``) on the newest version.

    The worker of another process checkpoints every version in the shared data dir; this polls
    for a newer one and follows it (``Unlearner.follow_checkpoint``: the forgotten rows are erased
    from the K this process holds, never recomputed), so reads lag the worker by about
    ``interval_s``.
    """

    def __init__(self, state: ServiceState, interval_s: float = 1.0):
        self.state = state
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def poll(self) -> bool:
        """Swap in a newer checkpointed version if there is one. Returns whether it did."""
        u = self.state.unlearner
        if u is None or not u.follow_checkpoint(self.state.settings.checkpoint_dir):
            return False
        log.info("following the worker: now serving version %d", u.version)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:
                # The worker may prune the version being read; the next poll finds the newer one.
                log.warning("could not load the newest checkpoint; retrying", exc_info=True)
