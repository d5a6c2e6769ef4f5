"""Errors raised by the engine. Every message says what the caller should fix."""

from __future__ import annotations

from collections.abc import Sequence


class UnlearnError(ValueError):
    """Base class of every error the engine raises on bad input or an impossible request."""


class InvalidInputError(UnlearnError):
    """Inputs or targets have the wrong shape, dtype, or non-finite values."""


class RefinementLimitError(InvalidInputError):
    """An exact request would refine more records than the caller allows (``max_refinements``).

    Attributes:
      count: the records it would refine; limit: the most allowed.
    """

    def __init__(self, message: str, count: int, limit: int):
        super().__init__(message)
        self.count, self.limit = count, limit


class InvalidForgetSetError(UnlearnError):
    """A forget set that is empty, has duplicated ids, or would remove every remaining point."""


class _IdsError(UnlearnError):
    _what = ""

    def __init__(self, ids: Sequence[str], hint: str = ""):
        self.ids = list(ids)
        more = len(self.ids) - 20
        shown = ", ".join(self.ids[:20]) + (f" and {more} more" if more > 0 else "")
        super().__init__(f"{len(self.ids)} {self._what}: {shown}.{(' ' + hint) if hint else ''}")


class UnknownIdsError(_IdsError):
    """Ids that were never in the training set."""

    _what = "id(s) are not in the training set"


class AlreadyForgottenError(_IdsError):
    """Ids that are forgotten already, or queued to be forgotten."""

    _what = "id(s) are already forgotten or queued to be forgotten"


class DatasetError(UnlearnError):
    """A data set that cannot be loaded as asked (missing files, duplicated ids, bad arrays)."""


class SolverError(RuntimeError):
    """A solve that did not reach its tolerance. The model is left unchanged."""


class NotCertifiedError(SolverError):
    """A certificate (relative stationarity residual, recomputed from α and K) above the tolerance
    times the operator's slack: nothing is published. ``alpha`` is the finite α reached (or
    ``None``), from which a ``dtype auto`` model finishes the solve in float64."""

    def __init__(self, message: str, alpha=None):
        super().__init__(message)
        self.alpha = alpha


class ComputationCancelled(RuntimeError):
    """A long read (Newton refinements of attribution or self-influence) stopped between two of
    its steps because its caller asked (its ``cancelled`` callback returned True: the client
    left, the server is shutting down). Nothing changed: reads only."""


class ResourceError(UnlearnError):
    """A configuration whose kernel does not fit in memory."""
