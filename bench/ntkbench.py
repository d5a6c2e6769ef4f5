"""NTK precompute speed: neural-tangents STRUCTURED_DERIVATIVES (what ``service_core.kernels`` uses)
against JACOBIAN_CONTRACTION on the same blocks, and the whole full-form kernel of a workload.

The whole kernel is computed in a child process (``python -m bench.ntkbench child ...``) so that its
peak memory (``VmHWM``, and numpy's allocations through ``tracemalloc``) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

import jax
import numpy as np


def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def load_inputs(workload: str, quick: bool, mnist_dir: str, mnist_width: int):
    """(model, x (N, n_in) float32, description) of a workload, or a skip message (str)."""
    from pathlib import Path

    from service_core import ModelConfig
    from service_core.data import load_digits, load_mnist
    from service_core.models import build_model

    from .figure1 import stratified_subset

    if workload == "digits":
        ds = load_digits(seed=0)
        width = 512
        if quick:
            ds, width = stratified_subset(ds, 10), 32
        cfg = ModelConfig(kind="mlp", width=width, depth=2)
        desc = f"digits MLP 2×{width}"
    else:
        d = Path(mnist_dir)
        if not d.is_dir() or not any(d.glob("t10k-images-idx3-ubyte*")):
            return f"mnist skipped: no MNIST IDX files in {d}"
        per_class = 20 if quick else 200
        width = 64 if quick else mnist_width
        ds = load_mnist(d, seed=0, train_per_class=per_class, test_per_class=per_class)
        cfg = ModelConfig(kind="mlp", width=width, depth=3)
        desc = f"MNIST FCNN 3×{width}"
    model = build_model(cfg, ds.input_shape, ds.output_dim)
    x = np.asarray(model.flatten_inputs(ds.x), np.float32)
    return model, x, desc


def _time(fn, reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return first, (statistics.median(ts) if ts else first), len(ts), out


def block_comparison(model, x, block: int, log=print) -> dict:
    """One off-diagonal block (points [0, b) × [b, 2b)) of the full form by both implementations."""
    from service_core.kernels import empirical_block_fn

    d, p = model.output_dim, model.n_params
    import neural_tangents as nt  # after service_core.kernels: its import fixes are in place

    a, b = x[:block], x[block : 2 * block]
    out = {"block": block, "n_params": p, "d": d}
    sd = empirical_block_fn(model.apply_fn, model.params0, "full")  # the engine's block function
    out["sd_source"] = "service_core.kernels.empirical_block_fn"
    first, med, n, k_sd = _time(lambda: sd(a, b), 5)
    out.update(sd_first_s=first, sd_s=med, sd_repeats=n)
    jc_bytes = (
        block * d * p * 4
    )  # one Jacobian; measured peak here: 3.1 GB at 32 points of the 2.9M-parameter FCNN
    out["jc_jacobian_bytes"] = jc_bytes
    if jc_bytes > 0.35 * _mem_available_bytes():
        out["jc_skipped"] = (
            f"its Jacobian of {block}·{d} × {p:,} float32 = {jc_bytes / 1e9:.1f} GB exceeds 35 % of the "
            f"memory available now ({_mem_available_bytes() / 1e9:.1f} GB, machine shared)"
        )
        log(f"      block {block}: SD {med:.4f} s; JC skipped: {out['jc_skipped']}")
        return out
    fn = nt.empirical_ntk_fn(
        model.apply_fn,
        trace_axes=(),
        vmap_axes=0,
        implementation=nt.NtkImplementation.JACOBIAN_CONTRACTION,
    )
    jc = jax.jit(lambda a, b: fn(a, b, model.params0))
    t0 = time.perf_counter()
    k_jc = jax.block_until_ready(jc(a, b))
    jc_first = time.perf_counter() - t0
    reps = 2 if jc_first < 30 else 1
    _, jc_med, jc_n, k_jc = _time(lambda: jc(a, b), reps)
    k_sd, k_jc = np.asarray(k_sd, np.float64), np.asarray(k_jc, np.float64)
    out.update(
        jc_first_s=jc_first,
        jc_s=jc_med,
        jc_repeats=jc_n,
        speedup=jc_med / med,
        max_abs_diff_rel=float(np.max(np.abs(k_sd - k_jc)) / np.max(np.abs(k_jc))),
        fro_diff_rel=float(np.linalg.norm(k_sd - k_jc) / np.linalg.norm(k_jc)),
        shape=list(k_sd.shape),
    )
    log(
        f"      block {block}×{block} (full form {tuple(k_sd.shape)}): SD {med:.4f} s, JC {jc_med:.2f} s → {out['speedup']:.0f}×; "
        f"max|ΔK|/max|K| {out['max_abs_diff_rel']:.1e}, ‖ΔK‖/‖K‖ {out['fro_diff_rel']:.1e}"
    )
    return out


def _peak_rss_gib() -> float:
    """This process's peak resident memory: ``VmHWM`` of its own address space (``ru_maxrss`` is
    not used: Linux carries it across ``exec`` from the forking parent)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def full_kernel_child(args) -> None:
    """Child process: the whole full-form kernel via ``Model.train_kernel`` (no cache); prints JSON."""
    loaded = load_inputs(args.workload, args.quick, args.mnist_dir, args.mnist_width)
    if isinstance(loaded, str):
        print(json.dumps({"skipped": loaded}))
        return
    model, x, desc = loaded
    rss_before = _peak_rss_gib()
    tracemalloc.start()
    t0 = time.perf_counter()
    k, _ = model.train_kernel(x, "full", cache_dir=None, progress=False, block_size=args.block_size)
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        json.dumps(
            {
                "description": desc,
                "n": int(len(x)),
                "d": model.output_dim,
                "n_params": model.n_params,
                "shape": list(k.shape),
                "bytes": int(k.nbytes),
                "seconds": seconds,
                "block_size": args.block_size,
                "peak_rss_gib": _peak_rss_gib(),
                "rss_before_gib": rss_before,
                "tracemalloc_peak_gib": traced_peak / 2**30,
                "finite": bool(np.isfinite(k).all()),
                "symmetric_max_diff": float(np.max(np.abs(k[:200, :200] - k[:200, :200].T))),
            }
        )
    )


def run_ntk(args, log=print) -> dict:
    """The ``ntk`` subcommand: block comparisons and the whole kernel for each workload."""
    t_start = time.perf_counter()
    res = {"workloads": {}}
    workloads = ["mnist", "digits"] if args.workload == "all" else [args.workload]
    for wl in workloads:
        loaded = load_inputs(wl, args.quick, args.mnist_dir, args.mnist_width)
        if isinstance(loaded, str):
            log(f"== ntk / {wl}: {loaded}")
            res["workloads"][wl] = {"skipped": loaded}
            continue
        model, x, desc = loaded
        log(
            f"\n== ntk / {wl}: {desc}, N = {len(x)}, P = {model.n_params:,}, d = {model.output_dim}"
        )
        entry = {
            "description": desc,
            "n": int(len(x)),
            "n_params": model.n_params,
            "d": model.output_dim,
        }
        # the whole kernel first, in a child process (clean peak memory)
        cmd = [
            sys.executable,
            "-m",
            "bench.ntkbench",
            "child",
            "--workload",
            wl,
            "--mnist-dir",
            str(args.mnist_dir),
            "--mnist-width",
            str(args.mnist_width),
            "--block-size",
            "128",
        ] + (["--quick"] if args.quick else [])
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        wall = time.perf_counter() - t0
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            entry["full"] = {"error": proc.stderr[-2000:]}
            log(f"   whole kernel: child failed: {proc.stderr[-500:]}")
        else:
            full = json.loads(lines[-1])
            full["child_wall_s"] = wall
            entry["full"] = full
            log(
                f"   whole kernel {tuple(full['shape'])} ({full['bytes'] / 1e9:.2f} GB): {full['seconds']:.1f} s "
                f"(child process {wall:.1f} s with imports); peak RSS {full['peak_rss_gib']:.2f} GiB, numpy peak (tracemalloc) "
                f"{full['tracemalloc_peak_gib']:.2f} GiB"
            )
        blocks = [16] if args.quick else ([32, 64, 128] if wl == "mnist" else [64, 128])
        blocks = [b for b in blocks if 2 * b <= len(x)]
        entry["blocks"] = [block_comparison(model, x, b, log=log) for b in blocks]
        res["workloads"][wl] = entry
    res["seconds_total"] = time.perf_counter() - t_start
    return res


def _child_main(argv):
    ap = argparse.ArgumentParser(prog="bench.ntkbench child")
    ap.add_argument("--workload", default="mnist")
    ap.add_argument("--mnist-dir", required=True)
    ap.add_argument("--mnist-width", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    full_kernel_child(ap.parse_args(argv))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        _child_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m bench.ntkbench child --workload W --mnist-dir DIR")
