"""Smoke test of the benchmark (``ntk-unlearn bench figure1 --quick``): it runs end to end on a tiny
digits problem, writes its JSON, Markdown and PNG, and its numbers mean what they say."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import cli

REPO = Path(__file__).resolve().parent.parent

# runs the benchmark end to end on a tiny workload (about a minute)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    root_md = REPO / "BENCHMARKS.md"
    before = root_md.stat().st_mtime if root_md.exists() else None
    rc = cli.main(["figure1", "--quick", "--workload", "digits", "--out", str(out)])
    after = root_md.stat().st_mtime if root_md.exists() else None
    return out, rc, before == after


def _rows(res, method):
    return [r for r in res["rows"] if r["method"] == method and "error" not in r]


def test_outputs_written(quick_run):
    out, rc, root_untouched = quick_run
    assert rc == 0
    for name in (
        "figure1-digits.json",
        "figure1-digits.md",
        "figure1-digits.png",
        "convergence-digits.png",
        "BENCHMARKS.md",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "figure1-digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert root_untouched, (
        "a --quick run into another folder must not rewrite the repository's BENCHMARKS.md"
    )
    md = (out / "BENCHMARKS.md").read_text()
    assert "Acceptance criteria" in md and "| removal | method |" in md and "Machine:" in md


def test_numbers_are_sane(quick_run):
    out, _, _ = quick_run
    res = json.loads((out / "figure1-digits.json").read_text())
    assert res["fractions"] == [10, 50]
    methods = {r["method"] for r in res["rows"]}
    for m in (
        "theta-cg",
        "alpha-paper",
        "alpha-cg",
        "auto",
        "alpha-cg+refine",
        "retrain",
        "retrain from scratch",
        "random",
    ):
        assert m in methods, m
    for r in res["rows"]:
        assert "error" not in r, r
        if r["method"] not in ("random", "exact retraining (float64 reference)"):
            assert r["warm_s"] > 0 and r["n_warm"] >= 1
    for frac in (10, 50):
        ref = res["reference"][str(frac)]
        # the float64 references are solved to tight tolerances
        assert ref["exact_step"]["residual"] < 1e-10 and ref["retrain"]["residual"] < 1e-10
        step_error = ref["exact_step_distance_to_retraining"]
        cg = next(r for r in _rows(res, "alpha-cg") if r["fraction"] == frac)
        paper = next(r for r in _rows(res, "alpha-paper") if r["fraction"] == frac)
        refine = next(r for r in _rows(res, "alpha-cg+refine") if r["fraction"] == frac)
        theta = next(r for r in _rows(res, "theta-cg") if r["fraction"] == frac)
        rnd = next(r for r in _rows(res, "random") if r["fraction"] == frac)
        retrain = next(r for r in _rows(res, "retrain") if r["fraction"] == frac)
        # alpha-cg solves the influence step to float32 accuracy; the step itself is not exact
        # retraining for cross-entropy, so its distance to retraining is the step's own error
        assert cg["converged"] and cg["dist_step"] < 1e-4
        assert cg["dist_retrain"] == pytest.approx(step_error, rel=0.05)
        # the θ-space baseline solves the same step
        assert theta["dist_retrain"] == pytest.approx(cg["dist_retrain"], rel=0.05)
        # the paper form after 500 iterations is near the same step, far less accurately
        assert paper["iterations"] == 500
        assert paper["dist_step"] < 0.1 and paper["dist_step"] > 10 * cg["dist_step"]
        assert abs(paper["test_acc"] - cg["test_acc"]) <= 0.02
        # refinement reaches retraining (float32); so does retraining itself
        scratch = next(r for r in _rows(res, "retrain from scratch") if r["fraction"] == frac)
        assert (
            refine["dist_retrain"] < 1e-3
            and retrain["dist_retrain"] < 1e-3
            and scratch["dist_retrain"] < 1e-3
        )
        assert refine["dist_retrain"] < cg["dist_retrain"]
        # a random change of the same norm is ~orthogonal to the true one: distance ≈ √2
        assert abs(rnd["dist_retrain"] - math.sqrt(2)) < 0.3
    tr = res["trajectories"]["10"]["summary"]
    assert (
        tr["alpha_cg_iterations"] is not None
        and tr["alpha_cg_iterations"] < tr["alpha_paper_iterations"]
    )


def test_cifar_workload_forgets_from_one_class(tmp_path):
    """The CIFAR-10 workload (the paper's CNN pair): a linearised 3-block CNN under squared error, forget
    sets drawn from class 0 only; skipped with a message where the files are absent."""
    from bench import figure1

    args = cli.build_parser().parse_args(
        ["figure1", "--workload", "cifar", "--quick", "--cifar-dir", str(tmp_path)]
    )
    assert "cifar skipped" in figure1.make_workload("cifar", args)
    shared = REPO.parent / "shared" / "data" / "cifar10"
    if not (shared / "airplane_automobile_train.npz").exists():
        pytest.skip("../shared/data/cifar10 is absent")
    args.cifar_dir = shared
    wl = figure1.make_workload("cifar", args)
    assert (
        wl.model.kind == "cnn"
        and wl.model.depth == 3
        and wl.train.loss == "mse"
        and wl.forget_classes == (0,)
    )
    labels = wl.dataset.y
    ids = figure1.forget_ids(list(wl.dataset.ids), labels, 0.3, 0, wl.forget_classes)
    index = {i: p for p, i in enumerate(wl.dataset.ids)}
    assert len(ids) == round(0.3 * (labels == 0).sum()) and all(labels[index[i]] == 0 for i in ids)
