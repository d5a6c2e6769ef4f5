"""Per-block kernel timings for the image models on CIFAR-2 (one 32×32×3 block pair per row).

* ``cnn`` (width 128, depth 3, d = 1 by default): the empirical NTK in full form by neural-tangents'
  STRUCTURED_DERIVATIVES (``kernels.empirical_block_fn``, what ``Model.train_kernel`` uses) and
  JACOBIAN_CONTRACTION, with their
  relative difference;
* ``inf-cnn`` with and without pooling, and ``inf-mlp``: the analytic NTK (``models.KernelModel.kernel``
  on one block pair, compiled by its first call).

Each timing is the second call of a jitted block function on an off-diagonal block pair (the first
compiles). Run: ``python -m bench.ntk_timing [--blocks 32 64 128] [--pooled-block 8]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from service_core import build_model
from service_core.config import ModelConfig
from service_core.data import load_cifar2
from service_core.kernels import empirical_block_fn
from service_core.models import KernelModel

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _timed(fn, *args) -> tuple[np.ndarray, float, float]:
    t0 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(fn(*args)))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(fn(*args)))
    return out, first, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ntk_timing", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", type=Path, default=SHARED / "cifar10" / "airplane_automobile_train.npz"
    )
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument(
        "--pooled-block", type=int, default=8, help="block side for the pooled analytic CNN kernel"
    )
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--output-dim", type=int, default=1)
    args = p.parse_args(argv)

    need = 2 * max(args.blocks + [args.pooled_block])
    x = load_cifar2(args.data, seed=0, n_train=need, test_path=False).x
    rows = [
        "| kernel | block | first call (compile) s | steady s | per pair ms | rel. diff SD vs JC |",
        "|---|---|---|---|---|---|",
    ]

    model = build_model(
        ModelConfig(kind="cnn", width=args.width, depth=args.depth), x.shape[1:], args.output_dim
    )
    xf = np.asarray(model.flatten_inputs(x))
    import neural_tangents as nt  # after service_core: its import fixes are in place

    jc = nt.empirical_ntk_fn(
        model.apply_fn,
        trace_axes=(),
        vmap_axes=0,
        implementation=nt.NtkImplementation.JACOBIAN_CONTRACTION,
    )
    fns = {
        "STRUCTURED_DERIVATIVES": empirical_block_fn(model.apply_fn, model.params0, "full"),
        "JACOBIAN_CONTRACTION": jax.jit(lambda a, b: jc(a, b, model.params0)),
    }
    for bs in args.blocks:
        a, b = xf[:bs], xf[bs : 2 * bs]
        out = {}
        for impl, fn in fns.items():
            out[impl], first, steady = _timed(fn, a, b)
            diff = ""
            if impl == "JACOBIAN_CONTRACTION":
                ref = out[impl]
                diff = f"{np.linalg.norm(out['STRUCTURED_DERIVATIVES'] - ref) / np.linalg.norm(ref):.1e}"
            rows.append(
                f"| cnn w{args.width} d{args.depth} {impl.lower()} (P = {model.n_params}) | {bs}×{bs} | {first:.2f} "
                f"| {steady:.2f} | {1e3 * steady / bs**2:.2f} | {diff} |"
            )
            print(rows[-1], flush=True)

    for kind, pool, bs in (
        ("inf-cnn", False, max(args.blocks)),
        ("inf-cnn", True, args.pooled_block),
        ("inf-mlp", True, max(args.blocks)),
    ):
        km = KernelModel(ModelConfig(kind=kind, depth=args.depth, pool=pool), x.shape[1:], 1)
        a, b = x[:bs], x[bs : 2 * bs]
        _, first, steady = _timed(lambda a, b, km=km, bs=bs: km.kernel(a, b, block_size=bs), a, b)
        label = f"{kind} d{args.depth}" + (f" pool={pool}" if kind == "inf-cnn" else "")
        rows.append(
            f"| {label} (analytic) | {bs}×{bs} | {first:.2f} | {steady:.2f} | {1e3 * steady / bs**2:.2f} | |"
        )
        print(rows[-1], flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
