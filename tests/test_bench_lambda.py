"""Smoke test of ``ntk-unlearn bench lambda --quick`` (bench/lambda_sweep.py): it runs end to end on
a tiny network and writes its JSON, PNGs and Markdown section; its bookkeeping is checked against
the rows it reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import cli, lambda_sweep

MNIST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"


@pytest.mark.slow
@pytest.mark.skipif(not MNIST.exists(), reason="needs ../shared/data/mnist")
def test_bench_lambda_quick(tmp_path):
    rc = cli.main(["lambda", "--quick", "--out", str(tmp_path), "--mnist-dir", str(MNIST)])
    assert rc == 0
    res = json.loads((tmp_path / "lambda.json").read_text())
    assert (tmp_path / "lambda-figure2.png").stat().st_size > 0
    assert (tmp_path / "lambda-figure3.png").stat().st_size > 0
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert md.count(lambda_sweep.MARK_BEGIN) == 1 and "Figure 3" in md
    s = res["settings"]
    assert [r["lam"] for r in res["figure3"]] == s["lams3"]
    for r in res["figure3"]:
        assert len(r["grad_nl"]) == s["epochs"] and r["param_distance"][0] == 0.0
        assert len(r["test_rmse"]) == s["epochs"] // s["record_every"]
    rows = res["figure2"]
    assert len(rows) == len(s["lams2"]) * len(s["fractions"]) * 5
    for r in rows:
        if r["method"] == "retrain":
            assert r["rel_distance"] == 0.0 and r["rel_to_change"] == 0.0
        if r["method"] == "original":
            assert r["rel_to_change"] == pytest.approx(1.0)
        if r["method"] == "random":  # a random direction of the same norm: about √2 of the change
            assert 1.0 < r["rel_to_change"] < 2.0
        assert all(0.0 <= r[k] <= 1.0 for k in ("retain_acc", "forget_acc", "test_acc"))
    for frac in s["fractions"]:
        forgot = [r["n_forget"] for r in rows if r["fraction"] == frac]
        assert len(set(forgot)) == 1
        assert forgot[0] == 2 * round(frac / 100 * s["per_class"])
    # the claim's counts are recomputed from the rows
    lams = sorted(s["lams2"], reverse=True)
    for method in ("alpha", "theta"):
        held = sum(
            next(
                r
                for r in rows
                if r["lam"] == lams[0] and r["fraction"] == f and r["method"] == method
            )["rel_distance"]
            < next(
                r
                for r in rows
                if r["lam"] == lams[1] and r["fraction"] == f and r["method"] == method
            )["rel_distance"]
            for f in s["fractions"]
        )
        assert res["claim"][f"{method}/rel_distance"] == {"held": held, "of": len(s["fractions"])}
    assert math.isfinite(res["seconds_total"])
    # a second run replaces its section instead of appending another
    lambda_sweep.put_section(tmp_path / "BENCHMARKS.md", (tmp_path / "lambda.md").read_text())
    assert (tmp_path / "BENCHMARKS.md").read_text().count(lambda_sweep.MARK_BEGIN) == 1
