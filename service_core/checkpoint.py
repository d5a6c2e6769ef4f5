"""Versioned checkpoints with orbax-checkpoint: one directory per model version.

A save is complete only when orbax has finalised it (it writes to a temporary directory and
renames), so a crash mid-save leaves the previous version as the newest complete one. ``save``
deletes nothing: older versions hold the rows of records forgotten since, and ``prune`` deletes
them (and any unfinished save) once the new version is logged, published and reported
(docs/design.md, The order of a deletion). A pruned directory is first renamed out of orbax's
sight, so a crash during its deletion never leaves a half-deleted step that looks like a version.

K is not written: it is a function of the active inputs and the model (seeded), recomputed on
restore. Writing it would cost a pass over (N·d)² values per deletion (13 s for digits' 826 MB
here), and a restart is rare where deletions are not.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .layout import KernelLayout
from .state import FORGOTTEN_FORM, ModelState, id_digest

log = logging.getLogger(__name__)


class _HostRestoreFilter(logging.Filter):
    """Drops orbax's warning that a restore without a target tree is unsafe unless the device
    topology is the one the checkpoint was saved under: ``restore`` here reads the arrays to the
    host (numpy) and the engine places them itself, so it never applies, and a follower logged it
    once per version it followed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "expects a target tree to be provided for restore" not in record.getMessage()


logging.getLogger("absl").addFilter(_HostRestoreFilter())


def _manager(directory: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=False
        ),
    )


def save(directory: Path, state: ModelState) -> Path:
    """Write ``state`` as step ``state.version`` (older steps stay until ``prune``). Returns its
    directory.

    Raises:
      OSError and orbax errors: the save failed; the previous version is untouched.
    """
    with _manager(directory) as mngr:
        mngr.save(
            state.version,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(_saved_arrays(state)),
                meta=ocp.args.JsonSave(state.metadata()),
            ),
            force=True,
        )
        mngr.wait_until_finished()
    return Path(directory) / str(state.version)


def _saved_arrays(state: ModelState) -> dict[str, np.ndarray]:
    """The arrays a checkpoint holds: ``ModelState.arrays`` and f* when known, its inactive rows
    zeroed (a forgotten record's outputs are not kept). f* lets a follower serve the version
    without a pass over K (``deletion.follow``)."""
    arrays = {name: np.asarray(a) for name, a in state.arrays().items()}
    if state.f_star is not None:
        f_star = np.asarray(state.f_star)
        arrays["f_star"] = np.where(state.active[:, None], f_star, np.zeros((), f_star.dtype))
    return arrays


_PRUNED = ".pruned-"


def prune(directory: Path, keep: int) -> int:
    """Delete everything under ``directory`` but the complete step ``keep``: older (and newer)
    steps, unfinished saves, and prunes a crash cut short. Each entry is renamed to a hidden
    ``.pruned-*`` name first (atomic), then deleted.

    Only the process that saves versions (the worker) may call it: an unfinished save of another
    process would be deleted.

    Returns:
      the number of entries deleted.

    Raises:
      OSError: an entry could not be deleted (the next prune tries again).
    """
    directory = Path(directory)
    if not directory.exists():
        return 0
    doomed = []
    for entry in sorted(directory.iterdir()):
        if entry.name == str(keep):
            continue
        if not entry.name.startswith(_PRUNED):
            hidden = directory / f"{_PRUNED}{entry.name}-{uuid.uuid4().hex[:8]}"
            os.replace(entry, hidden)
            entry = hidden
        doomed.append(entry)
    if doomed:
        _fsync_dir(directory)  # the renames are durable before any file goes
    for entry in doomed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    return len(doomed)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_version(directory: Path) -> int | None:
    """Newest complete version under ``directory``, or ``None``.

    A step the worker prunes while orbax lists the directory (renamed away between the listing
    and its ``stat``) raises ``FileNotFoundError`` in orbax: the listing is then done again (at
    most five times in all)."""
    for _ in range(4):
        try:
            return _latest_step(directory)
        except FileNotFoundError:
            continue
    return _latest_step(directory)


def _latest_step(directory: Path) -> int | None:
    if not Path(directory).exists():
        return None
    with _manager(directory) as mngr:
        return mngr.latest_step()


def newest_step_name(directory: Path) -> int | None:
    """The largest step directory name under ``directory`` (``None``: none), from one directory
    listing: cheap enough to poll many times a second. A hint only: orbax names a step's
    directory when its save is finalised (an unfinished save has a temporary name), but only
    ``latest_version`` and ``restore`` read what orbax considers complete."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None
    steps = [int(name) for name in names if name.isdecimal()]
    return max(steps, default=None)


def step_identity(directory: Path, version: int) -> tuple[int, int, int] | None:
    """Which directory holds step ``version`` now: (inode, modification and change times in ns),
    or ``None`` when there is none. A version whose save was dropped (``prune``) and written
    again has another identity, so a reader can tell the step it read is still the one there."""
    try:
        st = os.stat(Path(directory) / str(version))
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def newest_at_most(directory: Path, max_version: int) -> int | None:
    """The newest complete version under ``directory`` that is at most ``max_version`` (``None``:
    none). Listed again when a step is pruned during the listing, as ``latest_version``."""
    if not Path(directory).exists():
        return None
    for attempt in range(5):
        try:
            with _manager(directory) as mngr:
                steps = [s for s in mngr.all_steps() if s <= max_version]
            return max(steps, default=None)
        except FileNotFoundError:
            if attempt == 4:
                raise
    return None  # unreachable


def restore_newer(
    directory: Path, version: int, before_arrays=None, id_key: bytes = b"", reader=None
) -> ModelState | None:
    """``restore`` when the newest complete version is newer than ``version``, else ``None``.

    Arguments:
      reader: reads the checkpoint as ``read_newer(directory, version)`` does (the default); a
        follower passes one that reads it in another process (``app.reader``), so that orbax's
        Python work holds none of this process's GIL.
    """
    read = read_newer if reader is None else reader
    raw = read(directory, version)
    return None if raw is None else state_from_read(*raw, before_arrays, id_key)


def read_newer(
    directory: Path, version: int, max_version: int | None = None
) -> tuple[dict, dict[str, np.ndarray]] | None:
    """The newest complete version under ``directory`` (at most ``max_version`` when given) if it
    is newer than ``version``, as read from disk: its metadata and its arrays in host memory
    (numpy), or ``None``. Pure reading (orbax), no JAX array made: a follower may run it in
    another process and pass its result to ``state_from_read``.

    Raises:
      FileNotFoundError: the step was pruned while it was read (read again).
      OSError and orbax errors: the checkpoint could not be read.
    """
    step = (
        latest_version(directory) if max_version is None else newest_at_most(directory, max_version)
    )
    if step is None or step <= version:
        return None
    with _manager(directory) as mngr:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        out = mngr.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore()))
    return meta, {k: np.asarray(v) for k, v in out["arrays"].items()}


def restore(
    directory: Path, before_arrays=None, id_key: bytes = b"", max_version: int | None = None
) -> ModelState | None:
    """The newest complete version under ``directory``, or ``None`` when there is none.

    Arguments:
      before_arrays: called with the metadata before arrays become JAX arrays (the engine enables
        float64 there when the checkpoint is float64).

      id_key: the secret of the state's id digests (``ModelState.digest``); a checkpoint written
        before forgotten ids were digested has its clear ids digested here.
      max_version: restore the newest version at most this one (``None``: the newest). A
        follower passes the newest logged version: a newer checkpoint may still be dropped and
        written again with another batch (docs/design.md, Followers).

    Returns:
      the state with ``k=None`` (see the module docstring), and f* as the saving process computed
      it (``None`` in a checkpoint written without it).
    """
    raw = read_newer(directory, -1, max_version)
    return None if raw is None else state_from_read(*raw, before_arrays, id_key)


def state_from_read(
    meta: dict, arrays: dict[str, np.ndarray], before_arrays=None, id_key: bytes = b""
) -> ModelState:
    """The ``ModelState`` (``k=None``) of a checkpoint ``read_newer`` read; ``before_arrays`` and
    ``id_key`` as in ``restore``."""
    if before_arrays is not None:
        before_arrays(meta)
    arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
    return ModelState(
        version=int(meta["version"]),
        ids=np.array(meta["ids"], dtype=str),
        layout=KernelLayout(meta["form"], int(meta["meta"]["dataset"]["output_dim"])),
        residual=float(meta["residual"]),
        forgotten=tuple(
            meta["forgotten"]
            if meta.get("forgotten_form") == FORGOTTEN_FORM
            else (id_digest(id_key, i) for i in meta["forgotten"])
        ),
        id_key=id_key,
        history=tuple(meta["history"]),
        meta=meta["meta"],
        k=None,
        k_origin=meta.get("k_origin"),
        theta=arrays.pop("theta", None),
        **arrays,
    )
