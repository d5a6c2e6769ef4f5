"""Adding records (``Unlearner.add``): the model after adding A to a model trained on D equals the
model trained from scratch on D ∪ A (an independent build: its own kernel and Newton from α = 0),
and adding then forgetting the same ids returns to the model trained on D."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from service_core import ModelConfig, SolverConfig, TrainConfig, Unlearner, load_dataset
from service_core.addition import AlreadyActiveError
from service_core.errors import InvalidInputError

NETWORK = """
import jax
import jax.numpy as jnp

def net():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    params = {"hidden": {"w": jax.random.normal(k1, (4, 6)) * 0.6, "b": jnp.full((6,), 0.1)},
              "head": {"w": jax.random.normal(k2, (6, 3)) * 0.5, "b": jnp.zeros(3)}}
    return (lambda p, x: jnp.tanh(jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"]) @ p["head"]["w"]
            + p["head"]["b"])), params
"""


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.fixture
def network(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(NETWORK))
    return ModelConfig(kind="user", network=f"{path}:net")


def _build(data, model_cfg, loss):
    train = TrainConfig(loss=loss, lam=1e-2, dtype="float64")
    return Unlearner.build(data, model_cfg, train, SolverConfig(nystrom_rank=0), progress=False)


@pytest.mark.parametrize(("loss", "tol"), [("mse", 1e-8), ("ce", 1e-6)])
@pytest.mark.parametrize("n_added", [5, 30], ids=["in-free-rows", "grows-capacity"])
def test_add_equals_training_on_the_union(dataset_file, network, tmp_path, loss, tol, n_added):
    data = load_dataset(f"npz:{dataset_file}")
    base = data.subset(slice(0, data.n - n_added))
    added = data.subset(slice(data.n - n_added, data.n))
    u = _build(base, network, loss)
    before = u.predict(data.x_test if data.x_test is not None else data.x[:5])
    cap = u.state.capacity
    result = u.add(added.ids.tolist(), added.x, added.y, checkpoint_dir=tmp_path / "ck")
    assert result.version == 1 and result.n_added == n_added and u.n_train == data.n
    assert result.grew == (n_added > cap - base.n) == (n_added == 30)
    # the solve as a forget reports it (a SolveInfo, not a dict), its Newton steps beside it
    assert result.solve.method.startswith("newton/") and result.solve.converged
    assert result.solve.iterations == result.newton_steps >= 1
    x_test = data.x[:8] + 0.2
    scratch = _build(data, network, loss)
    rel = _rel(u.predict(x_test), scratch.predict(x_test))
    print(f"{loss} +{n_added}: relative distance to training on the union {rel:.2e}")
    assert rel < tol
    assert sorted(u.active_ids()) == sorted(data.ids.tolist())
    # the checkpoint restores to the same model
    restored = Unlearner.restore(tmp_path / "ck")
    assert _rel(restored.predict(x_test), scratch.predict(x_test)) < tol
    # forgetting what was added returns to the model trained on D alone
    u.forget(added.ids.tolist())
    x_before = data.x_test if data.x_test is not None else data.x[:5]
    back = _rel(u.predict(x_before), before)
    print(f"{loss} +{n_added} then forgotten: relative distance to the model on D {back:.2e}")
    assert back < tol


def test_add_refuses_active_ids_and_bad_rows(dataset_file, network):
    data = load_dataset(f"npz:{dataset_file}")
    u = _build(data.subset(slice(0, 40)), network, "mse")
    with pytest.raises(AlreadyActiveError, match="r00"):
        u.add(["r00", "new"], data.x[:2], data.y[:2])
    with pytest.raises(InvalidInputError):
        u.add(["new"], np.zeros((1, 5)), [0])
    with pytest.raises(InvalidInputError):
        u.add(["new"], np.full((1, 4), np.nan), [0])
    assert u.version == 0
    # a forgotten id may come back, as a new record
    u.forget(["r01"])
    u.add(["r01"], data.x[1:2], data.y[1:2])
    assert "r01" in u.active_ids() and not u.is_forgotten("r01")
    # an id longer than every id before is kept whole (ids are a fixed-width string array)
    u.add(["a-much-longer-record-id"], data.x[2:3] + 0.5, data.y[2:3])
    assert "a-much-longer-record-id" in u.active_ids() and u.n_train == 41


def test_a_follower_after_an_addition_erases_the_next_deletion_from_its_own_k(
    dataset_file, network, tmp_path
):
    """A follower's spare K buffer is the K it served before only after a deletion that erased
    it; after an addition (new rows in free slots, the same shape), the old K lacks the added
    rows, so the next deletion must not take the spare as holding K's values: the follower's K
    stays equal to the worker's through forget, add, forget."""
    data = load_dataset(f"npz:{dataset_file}")
    base = data.subset(slice(0, data.n - 2))
    added = data.subset(slice(data.n - 2, data.n))
    worker = _build(base, network, "mse")
    worker.save(tmp_path / "ck")
    follower = Unlearner.restore(tmp_path / "ck", progress=False)
    cap = worker.state.capacity

    def same_k() -> None:
        assert follower.version == worker.version
        np.testing.assert_array_equal(np.asarray(follower.state.k), np.asarray(worker.state.k))

    worker.forget(worker.active_ids()[:2], checkpoint_dir=tmp_path / "ck")
    assert follower.follow_checkpoint(tmp_path / "ck")
    same_k()
    assert follower._spare.holds(follower.state.k)  # erased: the old K, zeroed, is the spare
    worker.add(added.ids.tolist(), added.x, added.y, checkpoint_dir=tmp_path / "ck")
    assert follower.follow_checkpoint(tmp_path / "ck")
    assert follower.state.capacity == cap  # in free rows: K keeps its shape
    same_k()
    # not the old K (rows were added): a fresh buffer, a copy of the new K
    assert not follower._spare.reused and follower._spare.holds(follower.state.k)
    np.testing.assert_array_equal(np.asarray(follower._spare.buffer), np.asarray(follower.state.k))
    worker.forget(worker.active_ids()[:1], checkpoint_dir=tmp_path / "ck")
    assert follower.follow_checkpoint(tmp_path / "ck")
    same_k()


def test_a_k_replaced_twice_before_the_spare_is_made_is_not_reused(dataset_file, network):
    """A deletion offers its old K as the next spare for the K it made; an addition published
    before the spare is made (a library caller that skips ``after_publish``) replaces that K, so
    the offer lapses and a new buffer is made: a copy of the K served then."""
    data = load_dataset(f"npz:{dataset_file}")
    base = data.subset(slice(0, data.n - 2))
    added = data.subset(slice(data.n - 2, data.n))
    u = _build(base, network, "mse")
    u.forget(u.active_ids()[:2])
    u.add(added.ids.tolist(), added.x, added.y)  # makes the spare itself (no before_publish)
    assert not u._spare.reused and u._spare.holds(u.state.k)
    np.testing.assert_array_equal(np.asarray(u._spare.buffer), np.asarray(u.state.k))
    u.forget(u.active_ids()[:1])
    u.after_publish()
    assert u._spare.reused and u._spare.holds(u.state.k)
    np.testing.assert_array_equal(np.asarray(u._spare.buffer), np.asarray(u.state.k))


def test_an_additions_certificate_states_its_rounding_floor(dataset_file, network, tmp_path):
    """float32, λ = 1e-2: the addition's Newton meets its tolerance without stagnating, and its
    certificate still states the floor at its α (Eq. (F1)), recomputed here (it said 0)."""
    from service_core.deletion import problem_of
    from service_core.dual import rounding_floor

    data = load_dataset(f"npz:{dataset_file}")
    base, added = data.subset(slice(0, data.n - 5)), data.subset(slice(data.n - 5, data.n))
    train = TrainConfig(loss="mse", lam=1e-2, dtype="float32")
    u = Unlearner.build(base, network, train, SolverConfig(nystrom_rank=0), progress=False)
    u.add(added.ids.tolist(), added.x, added.y, checkpoint_dir=tmp_path / "ck")
    problem = problem_of(u.state)
    floor = rounding_floor(problem, u.state.alpha, problem.outputs(u.state.alpha))
    assert floor > 0 and u.state.certificate()["rounding_floor"] == pytest.approx(floor, rel=1e-3)


def test_a_failed_addition_far_outside_the_training_inputs_says_so(unlearner):
    """The solver's advice on a failed addition (a looser tol, slack, a larger lam) does not help
    when the added inputs are absurd (a break-it round added a row of 1e6 to pixels in [0, 1]):
    the failure then names the inputs' scale against the training inputs'."""
    from app.worker import _scale_hint

    held = float(np.max(np.abs(np.asarray(unlearner.state.x)[np.asarray(unlearner.state.active)])))
    hint = _scale_hint(np.full((1, 4), 1e6), unlearner)
    assert "reach |x| = 1e+06" in hint and "check the added records first" in hint
    assert f"{1e6 / held:.3g} times" in hint
    assert _scale_hint(np.full((1, 4), held), unlearner) == ""
