"""``serve --nonlinear`` over HTTP with a real Redis: the nonlinear network f(x; θ) is served, a
forget reports the honest certificate (gradient norm of the nonlinear retain risk) and the
linearisation gap, a refinement that misses fails the job, a restart restores θ, a mismatched
mode is refused.

Oracles: the network's forward pass and risk written out here in plain jnp (Dense layers with NTK
parameterisation, exact GELU), θ unravelled by the test itself, ``jax.grad`` of that risk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.cli import main as cli_main
from app.core.config import Settings
from app.main import create_app
from service_core import checkpoint, load_dataset
from service_core.nonlinear_serving import NonlinearUnlearner

jax.config.update("jax_enable_x64", True)

# a build (~50 s of compiles on 2 cores) and several restores: slow
pytestmark = [pytest.mark.redis, pytest.mark.slow]

WRITE = {"Authorization": "Bearer write-token"}
READ = {"Authorization": "Bearer read-token"}
WIDTH, W_STD, B_STD, LAM = 16, 1.0, 0.05, 1.0
TOL = 1e-6

NETWORK = f"""
import jax
from neural_tangents import stax


def net():
    init_fn, apply_fn, _ = stax.serial(
        stax.Dense({WIDTH}, W_std={W_STD}, b_std={B_STD}, parameterization="ntk"), stax.Gelu(),
        stax.Dense({WIDTH}, W_std={W_STD}, b_std={B_STD}, parameterization="ntk"), stax.Gelu(),
        stax.Dense(3, W_std={W_STD}, b_std={B_STD}, parameterization="ntk"),
    )
    _, params = init_fn(jax.random.PRNGKey(0), (-1, 4))
    return apply_fn, params
"""


@pytest.fixture(scope="module")
def network_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("net") / "gelu_net.py"
    path.write_text(NETWORK)
    return path


def _fields(dataset_file: Path, network_file: Path, **overrides) -> dict:
    return {
        "dataset": f"npz:{dataset_file}",
        "model": f"{network_file}:net",
        "loss": "mse",
        "lam": LAM,
        "dtype": "float64",
        "nonlinear": True,
        "nonlinear_refine": 5,
        "nonlinear_tol": TOL,
        "nonlinear_epochs": 100,
        **overrides,
    }


@pytest.fixture(scope="module")
def nonlinear_checkpoint(tmp_path_factory, dataset_file, network_file) -> Path:
    """Version 0 of the nonlinear model, built once; each test copies it into its data dir."""
    s = Settings(**_fields(dataset_file, network_file))
    u = NonlinearUnlearner.build(
        load_dataset(s.dataset, s.seed),
        s.to_model_config(),
        s.to_train_config(),
        s.to_solver_config(),
        progress=False,
        source=s.dataset_source(),
        options=s.nonlinear_options(),
    )
    directory = tmp_path_factory.mktemp("nl-base") / "checkpoints"
    u.save(directory)
    return directory


@pytest.fixture
def nl_settings(
    tmp_path, dataset_file, network_file, redis_url, redis_prefix, nonlinear_checkpoint
):
    """``make(**overrides)``: settings on a data dir holding the nonlinear version 0."""

    def make(**overrides) -> Settings:
        data_dir = tmp_path / "data"
        if not (data_dir / "checkpoints").exists():
            shutil.copytree(nonlinear_checkpoint, data_dir / "checkpoints")
        fields = _fields(dataset_file, network_file, **overrides)
        return Settings(
            **fields,
            data_dir=data_dir,
            api_token="write-token",
            read_token="read-token",
            redis_url=redis_url,
            redis_prefix=redis_prefix,
        )

    return make


def _data(dataset_file: Path):
    with np.load(dataset_file) as f:
        x = f["x"].astype(np.float64)
        y = np.eye(3)[f["y"]]
        ids = f["ids"].tolist()
    return x, y, ids


def _theta0_and_unravel():
    """θ0 of the network, drawn as the user's factory draws it, and the test's own unravel: the
    Dense layers' (W, b) in order, each W then b, flattened row-major."""
    from neural_tangents import stax

    dense = [stax.Dense(w, b_std=B_STD) for w in (WIDTH, WIDTH, 3)]  # b_std: with biases
    init_fn, _, _ = stax.serial(dense[0], stax.Gelu(), dense[1], stax.Gelu(), dense[2])
    _, params = init_fn(jax.random.PRNGKey(0), (-1, 4))
    dense = [tuple(jnp.asarray(a, jnp.float64) for a in p) for p in params if p]
    shapes = [(w.shape, b.shape) for w, b in dense]
    theta0 = jnp.concatenate([jnp.concatenate([w.ravel(), b.ravel()]) for w, b in dense])

    def unravel(theta):
        out, at = [], 0
        for ws, bs in shapes:
            w = theta[at : at + int(np.prod(ws))].reshape(ws)
            at += w.size
            b = theta[at : at + int(np.prod(bs))].reshape(bs)
            at += b.size
            out.append((w, b))
        return out

    return theta0, unravel


def forward(theta, x, unravel):
    """f(x; θ) by hand: NTK Dense out = σ_w/√fan_in · h W + σ_b b, exact GELU h Φ(h)."""
    h = jnp.asarray(x, jnp.float64)
    layers = unravel(jnp.asarray(theta))
    for i, (w, b) in enumerate(layers):
        h = W_STD / jnp.sqrt(h.shape[1]) * h @ w + B_STD * b
        if i < len(layers) - 1:
            h = 0.5 * h * (1 + jax.scipy.special.erf(h / jnp.sqrt(2.0)))
    return h


def retain_gradient_norm(theta, x, y, keep, theta0, unravel) -> float:
    """‖∇L_R(θ)‖ of (NL) over the rows ``keep``: mean of ½‖f − y‖² + (λ/2)‖θ − θ0‖²."""

    def risk(t):
        f = forward(t, x[keep], unravel)
        return jnp.mean(0.5 * jnp.sum((f - y[keep]) ** 2, axis=1)) + 0.5 * LAM * jnp.sum(
            (t - theta0) ** 2
        )

    return float(jnp.linalg.norm(jax.grad(risk)(jnp.asarray(theta))))


def _served_theta(client: TestClient):
    return np.asarray(client.app.state.service.unlearner.state.theta)


def test_nonlinear_serves_forgets_with_the_certificate_and_restarts(
    nl_settings, dataset_file, wait_for_job
):
    x, y, ids = _data(dataset_file)
    theta0, unravel = _theta0_and_unravel()
    settings = nl_settings()
    probe = x[:6]
    forget = ["r03", "r10", "r17"]
    with TestClient(create_app(settings)) as client:
        info = client.get("/v1/model", headers=READ).json()
        nl = info["nonlinear"]
        assert nl["mode"] == "nonlinear" and nl["lambda"] == LAM
        gap = nl["linearisation_gap"]
        assert gap["rmse"] > 0 and gap["threshold"] > 0
        assert (gap["warning"] is None) == (gap["relative"] <= gap["threshold"])
        # version 0: the training's certificate, the nonlinear gradient relative to θ0's
        theta_v0 = _served_theta(client)
        # θ0 is saved with the model: the test's own unravel agrees with the engine's at θ0
        np.testing.assert_allclose(
            theta0, np.asarray(client.app.state.service.unlearner.model.theta0), rtol=1e-6
        )
        everyone = np.ones(len(ids), bool)
        g0 = retain_gradient_norm(theta0, x, y, everyone, theta0, unravel)
        g_star = retain_gradient_norm(theta_v0, x, y, everyone, theta0, unravel)
        assert info["certificate"]["residual"] == pytest.approx(g_star / g0, rel=1e-5, abs=1e-14)
        trained = info["certificate"]["nonlinear"]
        assert trained["step"] is None and trained["grad_norm"] == pytest.approx(g_star, rel=1e-5)
        assert trained["reference"] == pytest.approx(g0, rel=1e-8)
        # predictions are the nonlinear network's at the published θ, not its linearisation's
        r = client.post("/v1/predict", json={"x": probe.tolist()}, headers=READ).json()
        want = np.asarray(forward(theta_v0, probe, unravel))
        np.testing.assert_allclose(r["outputs"], want, rtol=1e-10, atol=1e-12)

        # answers that would be linearised estimates are refused, not given wrong
        for method, path, body in [
            ("post", "/v1/influence", {"forget_ids": ["r01"], "x": probe.tolist(), "y": [0] * 6}),
            ("post", "/v1/attribute", {"x": probe.tolist(), "y": [0] * 6}),
            ("get", "/v1/self-influence", None),
        ]:
            resp = getattr(client, method)(path, headers=READ, **({"json": body} if body else {}))
            assert resp.status_code == 409, (path, resp.text)
            assert "nonlinear model" in resp.json()["detail"]
        # additions too, before anything is queued
        body = {"ids": ["new-1"], "x": probe[:1].tolist(), "y": [0]}
        resp = client.post("/v1/records", json=body, headers=WRITE)
        assert resp.status_code == 409 and "nonlinear model" in resp.json()["detail"], resp.text

        accepted = client.post("/v1/forget", json={"ids": forget}, headers=WRITE).json()
        job = wait_for_job(client, accepted["job_id"])
        assert job["status"] == "succeeded", job
        cert = job["solver"]["certificate"]
        nlc = cert["nonlinear"]
        assert nlc["step"] == "alpha" and nlc["enforced"] and nlc["met"]
        assert nlc["refine_steps"] >= 1 and job["refine"]["converged"]
        assert nlc["linearisation_gap"] == gap
        # the certificate recomputed independently at the published θ and at the previous θ
        theta_v1 = _served_theta(client)
        keep = np.array([i not in forget for i in ids])
        g_new = retain_gradient_norm(theta_v1, x, y, keep, theta0, unravel)
        g_prev = retain_gradient_norm(theta_v0, x, y, keep, theta0, unravel)
        assert nlc["reference"] == pytest.approx(g_prev, rel=1e-8)
        assert nlc["grad_norm"] == pytest.approx(g_new, rel=1e-4, abs=1e-10 * g_prev)
        assert nlc["relative"] <= TOL and g_new <= TOL * g_prev
        assert cert["residual"] == nlc["relative"] and cert["tolerance"] == TOL
        # served: version 1, the network at the new θ
        r = client.post("/v1/predict", json={"x": probe.tolist()}, headers=READ).json()
        assert r["model_version"] == 1
        want = np.asarray(forward(theta_v1, probe, unravel))
        np.testing.assert_allclose(r["outputs"], want, rtol=1e-10, atol=1e-12)
        assert client.get("/v1/model", headers=READ).json()["certificate"] == cert
        outputs_v1 = r["outputs"]

    # restart: the same θ, version and predictions (no retraining)
    with TestClient(create_app(settings)) as client:
        np.testing.assert_array_equal(_served_theta(client), theta_v1)
        r = client.post("/v1/predict", json={"x": probe.tolist()}, headers=READ).json()
        assert r["model_version"] == 1 and r["outputs"] == outputs_v1


def test_refinement_that_misses_fails_and_leaves_the_model_unchanged(
    nl_settings, dataset_file, wait_for_job
):
    x, _, _ = _data(dataset_file)
    settings = nl_settings(nonlinear_refine=1, nonlinear_tol=1e-300)
    with TestClient(create_app(settings)) as client:
        before = client.post("/v1/predict", json={"x": x[:4].tolist()}, headers=READ).json()
        accepted = client.post("/v1/forget", json={"ids": ["r05"]}, headers=WRITE).json()
        job = wait_for_job(client, accepted["job_id"])
        assert job["status"] == "failed", job
        assert "refinement missed its tolerance" in job["error"]
        assert "unchanged" in job["error"]
        after = client.post("/v1/predict", json={"x": x[:4].tolist()}, headers=READ).json()
        assert after == before and after["model_version"] == 0
        assert client.get("/v1/model", headers=READ).json()["version"] == 0
        assert checkpoint.latest_version(settings.checkpoint_dir) == 0
        ids = client.get("/v1/ids", headers=READ).json()["ids"]
        assert "r05" in ids


def test_a_receipt_says_its_certificate_was_not_met_nor_enforced(
    nl_settings, wait_for_job, tmp_path, capsys
):
    """Without refinement a nonlinear forget publishes whatever its step reaches: the receipt
    carries the miss, and verify-receipt says so (exit 0; 3 with --require-certificate)."""
    settings = nl_settings(nonlinear_refine=0, nonlinear_tol=1e-300)
    with TestClient(create_app(settings)) as client:
        accepted = client.post("/v1/forget", json={"ids": ["r05"]}, headers=WRITE).json()
        job = wait_for_job(client, accepted["job_id"])
        assert job["status"] == "succeeded", job
        receipt = client.get(f"/v1/jobs/{job['job_id']}/receipt", headers=READ).json()
        key = client.get("/v1/receipts/public-key", headers=READ).json()["public_key_pem"]
    nlc = receipt["payload"]["certificate"]["nonlinear"]
    assert nlc["relative"] > 1e-300 and not nlc["met"] and not nlc["enforced"], nlc
    (tmp_path / "r.json").write_text(json.dumps(receipt))
    (tmp_path / "k.pem").write_text(key)
    args = ["verify-receipt", str(tmp_path / "r.json"), "--public-key", str(tmp_path / "k.pem")]
    cli_main(args)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("valid: job") and out[1].startswith(
        "certificate NOT MET, not enforced"
    )
    assert f"{nlc['relative']:.2e}" in out[1]
    with pytest.raises(SystemExit) as exit_:
        cli_main([*args, "--json", "--require-certificate"])
    assert exit_.value.code == 3
    verdict = json.loads(capsys.readouterr().out)["certificate"]
    assert verdict["status"] == "not met" and verdict["enforced"] is False


def _worker_args(settings: Settings, nonlinear: bool) -> list[str]:
    args = [
        "worker",
        "--dataset", settings.dataset, "--model", settings.model, "--loss", settings.loss,
        "--lam", str(settings.lam), "--dtype", settings.dtype, "--data-dir", str(settings.data_dir),
        "--redis-url", settings.redis_url, "--redis-prefix", settings.redis_prefix,
    ]  # fmt: skip
    return args + (["--nonlinear"] if nonlinear else [])


def test_mismatched_mode_is_refused_with_one_line(nl_settings, base_checkpoint, tmp_path):
    # a nonlinear data dir started without --nonlinear
    settings = nl_settings()
    with pytest.raises(SystemExit) as refused:
        cli_main(_worker_args(settings, nonlinear=False))
    message = str(refused.value.code)
    assert "\n" not in message and message.startswith("ntk-unlearn worker:")
    assert "mode 'nonlinear' (checkpoint) ≠ 'linearised' (now): start with --nonlinear" in message
    # a linearised data dir started with --nonlinear
    other = settings.model_copy(update={"data_dir": tmp_path / "linear"})
    shutil.copytree(base_checkpoint, other.checkpoint_dir)
    with pytest.raises(SystemExit) as refused:
        cli_main(_worker_args(other, nonlinear=True))
    message = str(refused.value.code)
    assert "\n" not in message
    assert (
        "mode 'linearised' (checkpoint) ≠ 'nonlinear' (now): start without --nonlinear" in message
    )
