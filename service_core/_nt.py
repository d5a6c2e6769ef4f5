"""Import neural-tangents 0.6.5 on a lean install (no TensorFlow) beside JAX 0.5.3.

Two fixes, both deliberate and documented in docs/design.md:

* ``neural_tangents/__init__`` imports ``neural_tangents.experimental`` (TF interop), which needs
  TensorFlow and tf2jax (about 2 GB). We never use it, so a placeholder module is registered in its
  place before the import. Installing TensorFlow is therefore not required.
* STRUCTURED_DERIVATIVES, by far the fastest empirical NTK, looks up
  ``jax.interpreters.ad.source_info_util`` and ``jax.interpreters.ad.config``, which JAX stopped
  re-exporting in 0.4.26; they are restored here.
"""

from __future__ import annotations

import sys
import types

import jax
import jax.interpreters.ad as _ad
from jax._src import source_info_util as _source_info_util

if "neural_tangents.experimental" not in sys.modules:
    _placeholder = types.ModuleType("neural_tangents.experimental")
    _placeholder.__doc__ = (
        "Placeholder: TF interop is not installed (lean install, see docs/design.md)."
    )
    _placeholder.__path__ = []  # a package, so submodule imports fail cleanly
    sys.modules["neural_tangents.experimental"] = _placeholder

if not hasattr(_ad, "source_info_util"):
    _ad.source_info_util = _source_info_util
if not hasattr(_ad, "config"):
    _ad.config = jax.config

import neural_tangents as nt  # noqa: E402
from neural_tangents import stax  # noqa: E402

__all__ = ["nt", "stax"]
