"""The user's own network: loading ``--model FILE.py:NAME`` / ``package.module:NAME``, adapting
what ``NAME()`` returns, reading pretrained weights (``--params``), and naming leaves.

``NAME()`` returns ``(apply_fn, params)``: ``apply_fn(params, x)`` maps a batch ``(n, *input_shape)``
to outputs ``(n, d)`` and ``params`` is any JAX pytree, the pretrained weights θ_0. What the engine
then does with it (the linearisation at θ_0, the trainable/frozen split) is ``models.build_user_model``.

Recognised without glue (``adapt``):

* plain JAX and neural-tangents ``stax``: ``(apply_fn, params)`` as above (a stax ``apply_fn`` and
  the params its ``init_fn`` drew already have this form);
* Flax linen: ``(module, variables)``, a ``flax.linen.Module`` and its variables:
  ``apply_fn = module.apply``;
* Equinox (or any callable pytree of per-example functions): a single object, the model itself,
  applied to one example at a time: its array leaves are the parameters and the model is
  ``jax.vmap``-ed over the batch (what ``eqx.partition``/``eqx.combine`` do).

Leaf paths are '/'-joined keys (``Dense_0/kernel``, ``0/1``); ``jax.tree_util.keystr`` spellings
(``['Dense_0']['kernel']``, ``[0][1]``) are accepted wherever a path is read.

Every failure raises ``ModelLoadError`` with one line saying what to fix.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from .errors import UnlearnError


class ModelLoadError(UnlearnError):
    """The user's network cannot be loaded or used as given (file, name, outputs, params)."""


def _err(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:400]


def split_spec(spec: str) -> tuple[str, str]:
    """``'FILE.py:NAME'`` or ``'package.module:NAME'`` → ``(source, NAME)``.

    Raises:
      ModelLoadError: no ``:NAME`` part.
    """
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name.isidentifier():
        raise ModelLoadError(
            f"--model {spec!r}: give a network as FILE.py:NAME or package.module:NAME, where NAME() "
            "returns (apply_fn, params)"
        )
    return source, name


def is_file_source(source: str) -> bool:
    """Whether a spec's source names a file (``.py`` or a path) rather than a module."""
    return source.endswith(".py") or "/" in source or "\\" in source


def load_factory(spec: str) -> Callable:
    """The callable ``NAME`` of a spec (``split_spec``), its module imported from a file or by name.

    Raises:
      ModelLoadError: the file is missing, the module does not import, NAME is absent or not callable.
    """
    source, name = split_spec(spec)
    if is_file_source(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"--model {spec!r}: no such file {str(path)!r}")
        module_name = (
            "ntk_unlearn_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        )
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ModelLoadError(f"--model {spec!r}: {str(path)!r} is not a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(module_name, None)
            raise ModelLoadError(
                f"--model {spec!r}: running {str(path)!r} failed: {_err(e)}"
            ) from None
    else:
        try:
            module = importlib.import_module(source)
        except Exception as e:
            raise ModelLoadError(
                f"--model {spec!r}: cannot import module {source!r} ({_err(e)}); give FILE.py:NAME "
                "for a file"
            ) from None
    factory = getattr(module, name, None)
    if factory is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ModelLoadError(
            f"--model {spec!r}: {source} defines no {name!r} (callables there: "
            f"{', '.join(public[:12]) or 'none'})"
        )
    if not callable(factory):
        raise ModelLoadError(f"--model {spec!r}: {name} is not callable: it must be a function")
    return factory


def _mro_names(obj) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(obj).__mro__}


def is_flax_module(obj) -> bool:
    """A Flax linen ``Module`` (checked by class name: flax need not be installed)."""
    return "flax.linen.module.Module" in _mro_names(obj)


def adapt(result, spec: str = "") -> tuple[Callable, object, str]:
    """What ``NAME()`` returned → ``(apply_fn, params, framework)``, ``apply_fn(params, x)`` on a
    batch. ``framework``: ``'jax'`` (plain JAX or stax), ``'flax'`` or ``'equinox'``.

    Raises:
      ModelLoadError: a value of none of the recognised forms (module docstring).
    """
    if isinstance(result, tuple) and len(result) == 2:
        first, params = result
        if is_flax_module(first):
            return first.apply, params, "flax"
        if callable(first):
            return first, params, "jax"
    if not isinstance(result, tuple) and callable(result):
        # eqx.partition(model, eqx.is_array) / eqx.combine, without importing equinox: the arrays
        # are the params (None elsewhere), everything else stays in the static half.
        def is_array(leaf) -> bool:
            return isinstance(leaf, jax.Array | np.ndarray)

        params = jax.tree_util.tree_map(lambda v: v if is_array(v) else None, result)
        static = jax.tree_util.tree_map(lambda v: None if is_array(v) else v, result)
        if jax.tree_util.tree_leaves(params):

            def apply_fn(params, x):
                model = jax.tree_util.tree_map(
                    lambda p, s: s if p is None else p, params, static, is_leaf=lambda v: v is None
                )
                return jax.vmap(model)(x)

            return apply_fn, params, "equinox"
    kind = type(result).__name__
    raise ModelLoadError(
        f"--model {spec!r}: the factory returned a {kind}; it must return (apply_fn, params) "
        "(plain JAX or stax), (flax module, variables), or an Equinox module"
    )


def leaf_name(path) -> str:
    """A leaf's path as '/'-joined keys: ``Dense_0/kernel``, ``0/1``."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


_KEYSTR_PART = re.compile(r"\[(?:'([^']*)'|\"([^\"]*)\"|(\d+))\]|\.([A-Za-z_]\w*)")


def canonical_name(name: str) -> str:
    """A leaf path in either spelling (``keystr`` or '/'-joined) → the '/'-joined one."""
    if name.startswith(("[", ".")):
        parts = [next(g for g in m.groups() if g is not None) for m in _KEYSTR_PART.finditer(name)]
        if parts:
            return "/".join(parts)
    return name


def named_leaves(tree) -> dict[str, object]:
    """``{path: leaf}`` in flattening order (``leaf_name``)."""
    return {leaf_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shape(a) -> str:
    return "(" + ", ".join(str(int(s)) for s in np.shape(a)) + ")"


def load_params(path: str | Path, params):
    """``params`` with every leaf replaced by the one stored under its path in ``path``: an ``.npz``
    keyed by leaf path, or an orbax checkpoint directory (``ocp.StandardCheckpointer().save``; a
    ``CheckpointManager`` directory's newest step also works).

    Raises:
      ModelLoadError: the file is missing or unreadable, or its leaves do not match the factory's:
        the message names the missing, unexpected and mis-shaped leaf paths with their shapes.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"--params {str(path)!r}: no such file or directory")
    try:
        if p.is_dir():
            stored = named_leaves(_orbax_restore(p, params))
        else:
            with np.load(p, allow_pickle=False) as f:
                stored = {canonical_name(k): np.asarray(f[k]) for k in f.files}
    except ModelLoadError:
        raise
    except Exception as e:
        # numpy calls any file that is no .npy/.npz "pickled (object) data" and suggests loading
        # it unsafely: say what it is not, without that advice
        why = (
            "it is no .npz of arrays (nor a .npy)"
            if isinstance(e, ValueError) and "allow_pickle" in str(e)
            else _err(e)
        )
        raise ModelLoadError(
            f"--params {str(path)!r}: cannot read it as an .npz or an orbax checkpoint ({why})"
        ) from None
    expected = named_leaves(params)
    missing = [k for k in expected if k not in stored]
    extra = [k for k in stored if k not in expected]
    shapes = [
        f"{k} {_shape(stored[k])} (network {_shape(expected[k])})"
        for k in expected
        if k in stored and np.shape(stored[k]) != np.shape(expected[k])
    ]
    if missing or extra or shapes:
        problems = []
        if missing:
            problems.append(
                "missing " + ", ".join(f"{k} {_shape(expected[k])}" for k in missing[:10])
            )
        if extra:
            problems.append(
                "not in the network " + ", ".join(f"{k} {_shape(stored[k])}" for k in extra[:10])
            )
        if shapes:
            problems.append("other shape " + ", ".join(shapes[:10]))
        raise ModelLoadError(
            f"--params {str(path)!r} does not match the network's parameters: "
            + "; ".join(problems)
        )
    leaves, treedef = jax.tree_util.tree_flatten(params)
    names = list(expected)
    return jax.tree_util.tree_unflatten(
        treedef,
        [
            np.asarray(stored[n], dtype=np.asarray(leaf).dtype)
            for n, leaf in zip(names, leaves, strict=True)
        ],
    )


def _orbax_restore(directory: Path, params):
    """The pytree saved under ``directory``: restored onto the structure, shapes and dtypes of
    ``params`` when it has them (what orbax expects), else as saved (then ``load_params`` names
    the mismatch)."""
    import orbax.checkpoint as ocp

    item = directory
    steps = sorted((int(c.name), c) for c in directory.iterdir() if c.is_dir() and c.name.isdigit())
    if steps and not (directory / "_METADATA").exists():
        item = steps[-1][1]
        if (item / "default").is_dir():
            item = item / "default"
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), params
    )
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(item.absolute(), target)
        except Exception:  # another structure or shape: read it as saved, to say what differs
            return ckptr.restore(item.absolute())


def save_params(path: str | Path, params) -> Path:
    """Write ``params`` as an ``.npz`` keyed by '/'-joined leaf path (what ``load_params`` reads)."""
    p = Path(path)
    np.savez(p, **{k: np.asarray(v) for k, v in named_leaves(params).items()})
    return p if p.suffix == ".npz" else p.with_name(p.name + ".npz")


def digest(params) -> str:
    """sha256 of θ_0: every leaf's path, dtype, shape and bytes, in order (the params fingerprint
    that identifies a model in its checkpoints)."""
    h = hashlib.sha256()
    for name, leaf in named_leaves(params).items():
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]
