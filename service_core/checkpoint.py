"""Versioned checkpoints with orbax-checkpoint: one directory per model version.

A save is complete only when orbax has finalised it (it writes to a temporary directory and
renames), so a crash mid-save leaves the previous version as the newest complete one. Older
versions are deleted after a newer one is complete: they hold the rows of records forgotten since.

K is not written: it is a function of the active inputs and the model (seeded), recomputed on
restore. Writing it would cost a pass over (N·d)² values per deletion (13 s for digits' 826 MB
here), and a restart is rare where deletions are not.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .layout import KernelLayout
from .state import ModelState

log = logging.getLogger(__name__)


def _manager(directory: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False
        ),
    )


def save(directory: Path, state: ModelState) -> Path:
    """Write ``state`` as step ``state.version`` and delete older steps. Returns its directory.

    Raises:
      OSError and orbax errors: the save failed; the previous version is untouched.
    """
    with _manager(directory) as mngr:
        mngr.save(
            state.version,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave({k: np.asarray(v) for k, v in state.arrays().items()}),
                meta=ocp.args.JsonSave(state.metadata()),
            ),
            force=True,
        )
        mngr.wait_until_finished()
        for step in mngr.all_steps():
            if step != state.version:
                mngr.delete(step)
    return Path(directory) / str(state.version)


def latest_version(directory: Path) -> int | None:
    """Newest complete version under ``directory``, or ``None``."""
    if not Path(directory).exists():
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


def restore(directory: Path, before_arrays=None) -> ModelState | None:
    """The newest complete version under ``directory``, or ``None`` when there is none.

    Arguments:
      before_arrays: called with the metadata before arrays become JAX arrays (the engine enables
        float64 there when the checkpoint is float64).

    Returns:
      the state with ``k=None`` (see the module docstring).
    """
    step = latest_version(directory)
    if step is None:
        return None
    with _manager(directory) as mngr:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if before_arrays is not None:
            before_arrays(meta)
        out = mngr.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore()))
    arrays = {k: jnp.asarray(v) for k, v in out["arrays"].items()}
    return ModelState(
        version=int(meta["version"]),
        ids=np.array(meta["ids"], dtype=str),
        layout=KernelLayout(meta["form"], int(meta["meta"]["dataset"]["output_dim"])),
        residual=float(meta["residual"]),
        forgotten=tuple(meta["forgotten"]),
        history=tuple(meta["history"]),
        meta=meta["meta"],
        k=None,
        theta=arrays.pop("theta", None),
        **arrays,
    )


def restore_newer(directory: Path, version: int, before_arrays=None) -> ModelState | None:
    """``restore`` when the newest complete version is newer than ``version``, else ``None``."""
    newest = latest_version(directory)
    if newest is None or newest <= version:
        return None
    state = restore(directory, before_arrays)
    return state if state is not None and state.version > version else None
