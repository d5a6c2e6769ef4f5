"""``ntk-unlearn bench``: the benchmarks.

Subcommands:

* ``figure1`` (default): the paper's Figure 1 metrics on ``digits`` and ``mnist`` (``bench.figure1``);
* ``ntk``: NTK precompute speed against JACOBIAN_CONTRACTION and the whole MNIST kernel (``bench.ntkbench``);
* ``figure4``: the paper's Figure 4 (``bench.figure4``, its own flags);
* ``precision``: float32, ``dtype auto`` and float64 side by side: certificate reached, time, memory
  (``bench.precision``, its own flags); not part of ``all``;
* ``lambda``: the paper's Figures 2 and 3 (§4.3): a nonlinear FCNN beside its linearisation for
  several λ, and forgetting from it (``bench.lambda_sweep``, its own flags); not part of ``all``;
* ``e2e``: end-to-end deletion time over HTTP (``ntk-unlearn serve`` in a child process) against
  the engine's own time from the job record (``bench.e2e``; workloads digits and mnist);
* ``load``: HTTP load, ``/v1/predict`` with 1 and 100 rows from concurrent clients, alone and
  while forgets run, and the forget enqueue latency, against one ``serve`` or the split deployment
  (``--load-deployment``; ``bench.load``); not part of ``all``;
* ``follow-read``: how long a follower's checkpoint read keeps the API process's other threads
  waiting, read in the process or in ``app.reader``'s child, alternated (``bench.follow_read``,
  its own flags); not part of ``all``;
* ``attribute-stall``: predictions while ``/v1/attribute`` factors (``bench.attribute_stall``, its
  own flags); not part of ``all``;
* ``attribution``: leave-one-out attribution, LDS, mislabel detection, membership inference and cost
  (``bench.attribution``); not part of ``all``;
* ``all``: ntk, figure1 (digits and mnist), figure4;
* ``report``: no measurement; rebuild the Markdown, the figures and the combined ``BENCHMARKS.md``
  from the JSON files already in ``--out``.

The subcommands with their own flags list them with ``ntk-unlearn bench SUBCOMMAND --help``.

Every run writes ``<out>/<name>.json`` (every number), ``<out>/<name>.md`` and PNG figures, then
rebuilds the combined Markdown (``BENCHMARKS.md`` at the repository root for a full run into the
default output folder, else ``<out>/BENCHMARKS.md``) from all JSON files in ``<out>``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"
COMMANDS = ("figure1", "ntk", "figure4", "e2e", "load", "attribution", "all", "report")
# Dispatched before this parser, each with its own flags (``main``).
OWN_FLAGS = ("precision", "lambda", "follow-read", "attribute-stall")
WORKLOADS = ("digits", "mnist", "cifar")


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ntk-unlearn bench",
        description=(__doc__ or "").replace("``", ""),  # the docstring's markup, not the terminal's
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "command",
        nargs="?",
        default="figure1",
        choices=COMMANDS,
        metavar="{" + ",".join(COMMANDS + OWN_FLAGS) + "}",
        help="the benchmark to run (default figure1); see the list above",
    )
    ap.add_argument(
        "--workload",
        choices=("digits", "mnist", "cifar", "all"),
        default="all",
        help="the data set and network (default all; e2e: digits and mnist; load: digits unless mnist)",
    )
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default bench/results)"
    )
    ap.add_argument(
        "--md",
        type=Path,
        default=None,
        help="combined Markdown (default: BENCHMARKS.md at the repository root "
        "for a full run into the default folder, else OUT/BENCHMARKS.md)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    ap.add_argument(
        "--mnist-dir",
        type=Path,
        default=REPO / ".." / "shared" / "data" / "mnist",
        help="the MNIST test set (default ../shared/data/mnist)",
    )
    ap.add_argument(
        "--cifar-dir",
        type=Path,
        default=REPO / ".." / "shared" / "data" / "cifar10",
        help="the CIFAR-10 airplane/automobile subsets (default ../shared/data/cifar10)",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the forget sets and of the random baseline"
    )
    fig = ap.add_argument_group("figure1 (and ntk)")
    fig.add_argument(
        "--fractions", type=_ints, default=None, help="removal percentages, e.g. 10,30,50,70,90"
    )
    fig.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="warm repeats for calls of at most 5 s (default 5; --quick 2)",
    )
    fig.add_argument(
        "--mnist-width", type=int, default=1024, help="hidden width of the MNIST FCNN (paper: 1024)"
    )
    fig.add_argument(
        "--cifar-n",
        type=int,
        default=500,
        help="CIFAR-10 airplane/automobile training points (balanced; θ-space HVPs of the CNN are slow on 2 cores)",
    )
    fig.add_argument(
        "--cifar-width", type=int, default=16, help="channels of each conv block of the CIFAR CNN"
    )
    fig.add_argument(
        "--cholesky-max-dim",
        type=int,
        default=16384,
        help="run alpha-cholesky only where the engine's factorised dimension (bucket(N_R)·d) is at most this",
    )
    fig.add_argument(
        "--trajectory-fractions",
        type=_ints,
        default=None,
        help="fractions with CG-trajectory measurements (default: the first fraction)",
    )
    fig.add_argument(
        "--cold",
        choices=("all", "alpha-cg", "none"),
        default=None,
        help="methods whose cold start is measured (default all; --quick: alpha-cg)",
    )
    fig.add_argument(
        "--methods",
        type=lambda t: [m.strip() for m in t.split(",") if m.strip()],
        default=None,
        help="only these rows, e.g. alpha-cg,alpha-paper,retrain (default: all)",
    )
    fig.add_argument(
        "--no-profile", action="store_true", help="skip the warm-latency profile of alpha-cg"
    )
    fig.add_argument(
        "--no-bandwidth", action="store_true", help="skip the memory-bandwidth measurement"
    )
    e2e = ap.add_argument_group("e2e")
    e2e.add_argument("--forgets", type=int, default=5, help="timed forgets after the warm-up")
    e2e.add_argument(
        "--percent", type=float, default=1.0, help="ids per forget, %% of the initial ids"
    )
    e2e.add_argument("--poll-ms", type=int, default=20, help="job polling interval")
    e2e.add_argument(
        "--pause",
        type=float,
        default=0.5,
        help="seconds between forgets once the worker's post-publish work is logged",
    )
    e2e.add_argument(
        "--mnist-per-class", type=int, default=200, help="MNIST training points per class"
    )
    e2e.add_argument(
        "--ready-timeout", type=float, default=1200, help="seconds to wait for /readyz"
    )
    e2e.add_argument("--job-timeout", type=float, default=300, help="seconds to wait for a job")
    load = ap.add_argument_group("load")
    load.add_argument("--load-clients", type=int, default=16, help="concurrent clients")
    load.add_argument("--load-seconds", type=float, default=10.0, help="seconds per phase")
    load.add_argument("--load-forgets", type=int, default=50, help="forgets timed to their 202")
    load.add_argument(
        "--load-data-dir",
        type=Path,
        default=None,
        help="a data dir with the model built (copied; default: build it first)",
    )
    load.add_argument(
        "--load-serve-args",
        type=lambda t: t.split(),
        default=None,
        help="more 'serve' options, e.g. '--predict-batch-wait-ms 0' (split: the API process's; "
        "those a worker also takes go to the worker too)",
    )
    load.add_argument(
        "--load-deployment",
        choices=("single", "split", "both"),
        default="single",
        help="single: one 'serve' (API and worker); split: 'worker' at low CPU priority and "
        "'serve --no-worker' on one private Redis; both: single, then split, in one run",
    )
    load.add_argument(
        "--load-worker-nice",
        type=int,
        default=19,
        help="split: the worker's nice value (19: lowest CPU priority; 0: as the API)",
    )
    load.add_argument(
        "--load-worker-idle",
        action="store_true",
        help="split: run the worker under SCHED_IDLE too (chrt -i 0)",
    )
    load.add_argument(
        "--load-worker-cpus",
        default=None,
        help="split: pin the worker to these CPUs (a taskset -c list, e.g. 1; default: any)",
    )
    attr = ap.add_argument_group("attribution")
    attr.add_argument(
        "--parts",
        type=lambda t: [p.strip() for p in t.split(",") if p.strip()],
        default=None,
        help="attribution: parts to run, of loo,lds,mislabel,mia,cost (default: all)",
    )
    attr.add_argument(
        "--attr-tests", type=int, default=50, help="attribution: test points (loo, lds)"
    )
    attr.add_argument(
        "--attr-records", type=int, default=200, help="attribution: random records (loo)"
    )
    attr.add_argument(
        "--only",
        default=None,
        help="attribution: run only the loo and mislabel workloads whose title contains this text "
        "(e.g. MNIST)",
    )
    attr.add_argument(
        "--attr-per-class",
        type=int,
        default=30,
        help="attribution: training points per class of the loo, lds and mia workloads",
    )
    attr.add_argument(
        "--lds-subsets", type=int, default=100, help="attribution: random 50 %% subsets (lds)"
    )
    attr.add_argument(
        "--mislabel-per-class",
        type=int,
        default=60,
        help="attribution: training points per class of the mislabel workloads",
    )
    attr.add_argument(
        "--mislabel-exact",
        action="store_true",
        help="attribution: also rank by exact (refined) self-influence, one Newton retraining per "
        "record (hours at N = 1,000 on two cores)",
    )
    attr.add_argument(
        "--cost-per-class",
        type=int,
        default=200,
        help="attribution: MNIST training points per class of the cost part (200: the FCNN workload, N = 2,000)",
    )
    return ap


def _log(msg: str = "") -> None:
    print(msg, flush=True)


def _command_line(argv: list[str]) -> str:
    return "ntk-unlearn bench " + " ".join(shlex.quote(a) for a in argv)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, default=_json_default))


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def run_figure1(args, argv, machine, bandwidth) -> list[str]:
    from . import figure1, report

    written = []
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    for name in workloads:
        wl = figure1.make_workload(name, args)
        if isinstance(wl, str):
            _log(f"\n== figure1 / {name}: {wl}")
            continue
        res = figure1.run_workload(wl, args, bandwidth, log=_log)
        res["command"] = _command_line(argv)
        res["machine"] = machine
        res["quick"] = args.quick
        stem = f"figure1-{name}"
        _write_json(args.out / f"{stem}.json", res)
        report.plot_figure1(res, args.out / f"{stem}.png")
        report.plot_trajectories(res, args.out / f"convergence-{name}.png")
        md = report.figure1_markdown(res)
        (args.out / f"{stem}.md").write_text(md)
        _log("\n" + md)
        written.append(stem)
    return written


def run_ntk(args, argv, machine) -> None:
    from . import ntkbench, report

    res = ntkbench.run_ntk(args, log=_log)
    res["command"] = _command_line(argv)
    res["machine"] = machine
    res["quick"] = args.quick
    _write_json(args.out / "ntk.json", res)
    md = report.ntk_markdown(res)
    (args.out / "ntk.md").write_text(md)
    _log("\n" + md)


def run_attribution(args, argv, machine) -> None:
    import subprocess

    from . import attribution
    from .attribution import PARTS

    args.parts = args.parts or list(PARTS)
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if args.quick:
        args.attr_tests, args.attr_records, args.lds_subsets = 5, 10, 10
        args.attr_per_class, args.mislabel_per_class = 5, 10
    res = attribution.run(args, log=_log)
    res["command"] = _command_line(argv)
    res["machine"] = machine
    res["quick"] = args.quick
    res["commit"] = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    path = args.out / "attribution.json"
    if path.exists() and not args.quick:  # a run of some parts keeps the others' results
        old = json.loads(path.read_text())
        if not old.get("quick"):
            runs = old.get("runs", [{k: old.get(k) for k in ("command", "commit")}])
            res = {
                **old,
                **res,
                "runs": runs + [{"command": res["command"], "commit": res["commit"]}],
            }
    _write_json(path, res)
    attribution.scatter(res, args.out / "attribution-loo.png")
    md = attribution.markdown(res)
    (args.out / "attribution.md").write_text(md)
    _log("\n" + md)


def run_load(args, argv, machine) -> int:
    import subprocess

    from . import load

    res = load.run(args, log=_log)
    res["command"] = _command_line(argv)
    res["machine"] = machine
    res["commit"] = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    _write_json(args.out / "load.json", res)
    md = load.markdown(res)
    (args.out / "load.md").write_text(md)
    _log("\n" + md)
    return 0


def run_figure4(rest: list[str], args=None) -> int:
    if importlib.util.find_spec("bench.figure4") is None:
        _log("figure4: not available (bench/figure4.py does not exist yet)")
        return 0
    mod = importlib.import_module("bench.figure4")
    try:
        rc = mod.main(rest)
    except SystemExit as exc:  # its own argument parser
        rc = exc.code if isinstance(exc.code, int) else 1
    return int(rc or 0)


def rebuild(out: Path) -> None:
    """Per-workload Markdown and figures from the JSON files in ``out``."""
    from . import report

    for name in WORKLOADS:
        p = out / f"figure1-{name}.json"
        if p.exists():
            res = json.loads(p.read_text())
            (out / f"figure1-{name}.md").write_text(report.figure1_markdown(res))
            report.plot_figure1(res, out / f"figure1-{name}.png")
            report.plot_trajectories(res, out / f"convergence-{name}.png")
    if (out / "ntk.json").exists():
        (out / "ntk.md").write_text(report.ntk_markdown(json.loads((out / "ntk.json").read_text())))
    if (out / "attribution.json").exists():
        from . import attribution

        res = json.loads((out / "attribution.json").read_text())
        (out / "attribution.md").write_text(attribution.markdown(res))
        attribution.scatter(res, out / "attribution-loo.png")


def combined_markdown(out: Path) -> str:
    from . import report

    fig = {}
    for name in WORKLOADS:
        p = out / f"figure1-{name}.json"
        if p.exists():
            fig[name] = json.loads(p.read_text())
    ntk = json.loads((out / "ntk.json").read_text()) if (out / "ntk.json").exists() else None
    docs = [d for d in [*fig.values(), ntk] if d]
    if not docs:
        return ""
    m = max(docs, key=lambda d: d["machine"]["date_utc"])["machine"]
    commands = []
    runs = (
        ("ntk", ntk),
        *((f"figure1 {name}", fig.get(name)) for name in ("mnist", "digits", "cifar")),
    )
    for label, d in runs:
        if d:
            commands.append(f"- {label}: `{d['command']}` ({d['machine']['date_utc']})")
    lines = [
        "# Benchmarks",
        "",
        "Issue 3, item 7 (the paper's Figure 1 metrics on real data) and item 3 (NTK precompute), measured on the engine "
        "in `service_core` by `bench/` (`ntk-unlearn bench`, `make bench ARGS=...`). Every number below is measured; "
        "nothing is tuned for the report. Full data: `bench/results/*.json`.",
        "",
        "**Machine:** "
        + f"{m['cpu_model']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
        f"{m['memory_gib']:.1f} GiB memory, no accelerator ({', '.join(m['jax_devices'])}); Python {m['python']}, jax {m['jax']}, "
        f"jaxlib {m['jaxlib']}, neural-tangents {m['neural_tangents']}, numpy {m['numpy']}. "
        f"Load average at start {', '.join(f'{x:.1f}' for x in (m['loadavg_1_5_15'] or []))}. "
        + (
            "XLA's buffers on transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, set by `ntk-unlearn`)."
            if m.get("malloc_huge_pages")
            else "XLA's buffers on 4 KiB pages (no `glibc.malloc.hugetlb`)."
        ),
        "",
        "**Produced by:**",
        *commands,
        "",
        "Wall time of these runs: "
        + ", ".join(
            f"{label} {d['seconds_total'] / 60:.1f} min"
            for label, d in runs
            if d and d.get("seconds_total")
        )
        + ".",
        "",
        "Timings are wall-clock on a shared 2-core machine where other people's tests ran at the same time: expect noise of "
        "tens of per cent on any single number (medians are reported). Cold = first call after `jax.clear_caches()`.",
        "",
        report.acceptance_markdown(report.acceptance(fig, ntk)),
        report.reading_markdown(fig),
    ]
    if ntk:
        lines.append(report.ntk_markdown(ntk))
    for name in ("mnist", "digits", "cifar"):
        if name in fig:
            lines.append(report.figure1_markdown(fig[name]))
            if (out / f"figure1-{name}.png").exists():
                lines += [f"![Figure 1, {name}]({_rel(out / f'figure1-{name}.png')})", ""]
            if (out / f"convergence-{name}.png").exists():
                lines += [f"![CG convergence, {name}]({_rel(out / f'convergence-{name}.png')})", ""]
    if (out / "attribution.md").exists():
        lines += [(out / "attribution.md").read_text(), ""]
    if (out / "figure4.md").exists():
        lines += [
            "## Figure 4 (bench/figure4.py, by its own run)",
            "",
            (out / "figure4.md").read_text(),
            "",
        ]
    # sections written by their own runs (bench/e2e.py, bench/lambda_sweep.py) or by hand from two
    # runs (before/after)
    for name in (
        "engine-reshape-digits.md",
        "e2e.md",
        "precision.md",
        "precision-reading.md",
        "lambda.md",
        "lambda-reading.md",
        "load-digits.md",
    ):
        if (out / name).exists():
            lines += [(out / name).read_text(), ""]
    from .figure1 import __doc__ as protocol

    lines += ["## Protocol (bench/figure1.py)", "", "```", (protocol or "").strip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "figure4":
        return run_figure4(argv[1:])
    if argv and argv[0] == "precision":
        from . import precision

        return precision.main(argv[1:])
    if argv and argv[0] == "attribute-stall":
        from . import attribute_stall

        return attribute_stall.main(argv[1:])
    if argv and argv[0] == "follow-read":
        from . import follow_read

        return follow_read.main(argv[1:])
    if argv and argv[0] == "lambda":
        from . import lambda_sweep

        return lambda_sweep.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.quick:
        args.fractions = args.fractions or [10, 50]
        args.repeats = args.repeats or 2
        args.cold = args.cold or "alpha-cg"
    args.cold = args.cold or "all"
    args.fractions = args.fractions or [10, 30, 50, 70, 90]
    args.repeats = args.repeats or 5
    args.trajectory_fractions = args.trajectory_fractions or args.fractions[:1]
    args.mnist_dir = args.mnist_dir.resolve()
    args.cifar_dir = args.cifar_dir.resolve()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    from .machine import machine_info, memory_bandwidth

    if args.command == "report":
        rebuild(args.out)
        md = combined_markdown(args.out)
        target = args.md or (
            REPO / "BENCHMARKS.md"
            if args.out == DEFAULT_OUT.resolve()
            else args.out / "BENCHMARKS.md"
        )
        if md:
            target.write_text(md)
            _log(f"wrote {target}")
        return 0

    machine = machine_info()
    if args.command == "load":
        return run_load(args, argv, machine)
    if args.command == "e2e":
        from . import e2e

        return e2e.main(args, argv, machine, log=_log)
    _log(
        f"machine: {machine['cpu_model']}, {machine['usable_cores']} cores, {machine['memory_gib']:.1f} GiB, jax {machine['jax']}, "
        f"load {machine['loadavg_1_5_15']}"
    )
    rc = 0
    if args.command in ("ntk", "all"):
        run_ntk(args, argv, machine)
    if args.command == "attribution":
        run_attribution(args, argv, machine)
    if args.command in ("figure1", "all"):
        bandwidth = None
        if not args.no_bandwidth:
            bandwidth = memory_bandwidth(gib=0.25 if args.quick else 1.0)
            _log(
                f"memory bandwidth: numpy sum {bandwidth['numpy_sum']:.1f}, jnp.sum {bandwidth['jax_sum']:.1f}, "
                f"matvec {bandwidth['jax_matvec']:.1f} GB/s (best {bandwidth['best']:.1f})"
            )
        run_figure1(args, argv, machine, bandwidth)
    if args.command == "all":
        if args.quick:
            _log("figure4: skipped with --quick (bench/figure4.py has no small mode)")
        else:
            rc = run_figure4(["--out-dir", str(args.out)])
    md = combined_markdown(args.out)
    if md:
        target = args.md
        if target is None:
            target = (
                REPO / "BENCHMARKS.md"
                if (args.out == DEFAULT_OUT.resolve() and not args.quick)
                else args.out / "BENCHMARKS.md"
            )
        target.write_text(md)
        _log(f"\nwrote {target}")
    _log(f"bench {args.command}: {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
