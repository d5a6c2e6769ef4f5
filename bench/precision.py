"""Precision routes against each other (issue 11, item 3): float32, ``dtype auto`` (float32, promoted
to float64 when float32 cannot certify) and float64 throughout.

For each workload, loss and λ, every route runs in its own child process (so peak RSS is the
route's own): build version 0 (NTK from a shared on-disk cache, so kernel time is not counted twice),
then forget 1 % of the training set. Recorded per route: whether each version was published
(certified to ``tol``, no slack), its certificate, the precision it ended in, build and forget
seconds (kernel excluded from build: ``train_s``), K's bytes and the child's peak RSS.

    ntk-unlearn bench precision [--quick]   (or python -m bench.precision)

Writes ``bench/results/precision.json`` and ``precision.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
ROUTES = ("float32", "auto", "float64")


def _workloads(quick: bool) -> list[dict]:
    lams = (1e-3, 1e-4) if quick else (1e-3, 1e-4, 1e-5, 1e-6)
    digits = [
        {
            "data": "digits",
            "kind": "mlp",
            "width": 512,
            "loss": loss,
            "lam": lam,
            "n": 300 if quick else 500,
        }
        for loss in ("mse", "ce")
        for lam in lams
    ]
    others = [
        {"data": "mnist", "kind": "inf-mlp", "loss": "mse", "lam": 1e-6, "n": 4000},
        {"data": "cifar2", "kind": "cnn", "width": 16, "loss": "mse", "lam": 1e-6, "n": 500},
    ]
    return digits if quick else digits + others


def _load(w: dict):
    from service_core.data import load_cifar2, load_digits, load_mnist

    if w["data"] == "digits":
        ds = load_digits(seed=0)
        return ds if w["n"] is None else ds.subset(slice(0, w["n"]))
    if w["data"] == "mnist":
        directory = SHARED / "mnist"
        if not directory.exists():
            return None
        return load_mnist(directory, seed=0, train_per_class=w["n"] // 10, test_per_class=50)
    directory = SHARED / "cifar10"
    train, test = directory / "airplane_automobile_train.npz", directory / "airplane_automobile.npz"
    if not train.exists():
        return None
    return load_cifar2(train, seed=0, n_train=w["n"], test_path=test, n_test=100)


def _route(w: dict, dtype: str, cache: str, queue) -> None:
    """One route in a child process; puts its record on ``queue``."""
    import logging

    import numpy as np

    from service_core import ModelConfig, SolverConfig, TrainConfig, Unlearner
    from service_core.errors import NotCertifiedError, SolverError

    logging.disable(logging.WARNING)
    ds = _load(w)
    model = ModelConfig(kind=w["kind"], **({"width": w["width"]} if "width" in w else {}))
    train = TrainConfig(loss=w["loss"], lam=w["lam"], dtype=dtype)
    out: dict = {"route": dtype, "n": int(ds.n)}
    t0 = time.perf_counter()
    try:
        u = Unlearner.build(ds, model, train, SolverConfig(), cache_dir=Path(cache), progress=False)
    except (NotCertifiedError, SolverError) as e:
        out.update(built=False, error=str(e)[:300], build_s=time.perf_counter() - t0)
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        queue.put(out)
        return
    st = u.state
    solve = st.history[0]["solve"]
    out.update(
        built=True,
        build_s=time.perf_counter() - t0,
        train_s=float(solve["seconds"]),
        residual=float(st.residual),
        tol=float(st.train_config.resolved_tol()),
        dtype_after_build=st.dtype,
        promoted_at_build=bool(st.meta.get("precision", {}).get("promoted")),
        k_mib=float(np.asarray(st.k).nbytes / 2**20),
        min_lam_float32=float(st.meta["conditioning"]["min_lam_float32"]),
        kappa=float(st.meta["conditioning"]["kappa"]),
    )
    ids = u.active_ids()[:: max(1, st.n // max(1, st.n // 100))][: max(1, st.n // 100)]
    t1 = time.perf_counter()
    try:
        result = u.forget(ids)
        out.update(
            forgot=True,
            forget_s=time.perf_counter() - t1,
            forget_residual=float(result.residual),
            dtype_after_forget=u.state.dtype,
        )
    except (NotCertifiedError, SolverError) as e:
        out.update(forgot=False, forget_s=time.perf_counter() - t1, forget_error=str(e)[:300])
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(out)


def run(quick: bool, out_dir: Path) -> dict:
    ctx = mp.get_context("spawn")
    cache = out_dir / "precision-ntk-cache"
    rows = []
    for w in _workloads(quick):
        for dtype in ROUTES:
            queue = ctx.Queue()
            proc = ctx.Process(target=_route, args=(w, dtype, str(cache), queue))
            proc.start()
            try:
                rec = queue.get(timeout=3600)
            except Exception:  # noqa: BLE001 - the child died: recorded as such
                rec = {"route": dtype, "built": False, "error": f"child exited {proc.exitcode}"}
            proc.join()
            rec.update({k: v for k, v in w.items() if k != "n"})
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return {
        "command": "ntk-unlearn bench precision" + (" --quick" if quick else ""),
        "commit": commit,
        "machine": f"{platform.machine()}, {mp.cpu_count()} CPUs",
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        "## Precision routes: float32, auto, float64 (issue 11)",
        "",
        f"`{result['command']}` at {result['commit']} ({result['machine']}). Each route in its own process; "
        "NTK from a shared disk cache (train s excludes the kernel). Tolerance 1e-5 (float32 and auto; "
        "float64's default 1e-10), no slack. 'published' means the certificate, recomputed from α and K, met it. "
        "digits: the first 500 training points (300 with --quick), MLP 2×512, d = 10, full-form K; MNIST: "
        "inf-mlp (analytic NTK, trace form), 4,000 points; CIFAR-2: cnn width 16, 500 points, d = 2. "
        "Forget: 1 % of the points, refinement on.",
        "",
        "| data | model | loss | λ | route | build: published (residual) | precision | train s | forget 1 %: published (residual) | forget s | K MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        built = f"yes ({r['residual']:.1e})" if r.get("built") else "**no**"
        forgot = (
            f"yes ({r['forget_residual']:.1e})"
            if r.get("forgot")
            else ("**no**" if r.get("built") else "–")
        )
        prec = r.get("dtype_after_forget") or r.get("dtype_after_build") or "–"
        if r.get("promoted_at_build"):
            prec += " (promoted at build)"
        elif r.get("dtype_after_build") == "float32" and r.get("dtype_after_forget") == "float64":
            prec += " (promoted at forget)"
        lines.append(
            f"| {r['data']} | {r['kind']} | {r['loss']} | {r['lam']:g} | {r['route']} | {built} | {prec} | "
            f"{r.get('train_s', float('nan')):.2f} | {forgot} | {r.get('forget_s', float('nan')):.2f} | "
            f"{r.get('k_mib', float('nan')):.1f} | {r.get('peak_rss_mib', float('nan')):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ntk-unlearn bench precision")
    ap.add_argument("--quick", action="store_true", help="digits N = 300, λ 1e-3 and 1e-4 only")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.quick, args.out)
    name = "precision-quick" if args.quick else "precision"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
