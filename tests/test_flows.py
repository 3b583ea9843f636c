"""The four formulations of the flow: equivalence, conservation, the mirror identity."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_rel_err

import ddln_jax as dj

FORMULATIONS = ["layer", "reduced", "mirror", "dual"]
TS = jnp.linspace(0.0, 8.0, 20)


def _runs(L, problem):
    # Tsit5, not the default Auto: these runs are not stiff, and Auto compiles a second
    # (Rosenbrock) branch, doubling the suite's time here; Auto is tested in test_solvers.py.
    u0 = dj.gaussian_init(jax.random.PRNGKey(100 + L), L, problem.dim, 0.9)
    return {
        f: dj.simulate(
            problem, u0, t1=8.0, ts=TS, formulation=f, rtol=1e-11, atol=1e-13,
            solver=dfx.Tsit5(), save=("grad_Q", "grad_integral", "conserved"),
        )
        for f in FORMULATIONS
    }


@pytest.fixture(params=["lsq", "logistic"])
def problem(request, lsq_problem, logistic_problem):
    return lsq_problem if request.param == "lsq" else logistic_problem


# Least squares at L = 1, 2, 3 and 5, the logistic loss at L = 2 and 3: each pair compiles four
# programs (≈ 25 s of the suite), and L = 4 takes no code path that L = 3 and 5 do not (the
# geometry special-cases L = 1 and L = 2, in closed form; beyond, the depth is a shape).
@pytest.mark.parametrize(
    "problem, L",
    [("lsq", 1), ("lsq", 2), ("lsq", 3), ("lsq", 5), ("logistic", 2), ("logistic", 3)],
    indirect=["problem"],
)
def test_formulations(problem, L):
    """One set of runs per (problem, depth), checked three ways:

    - θ(t) agrees across layer/reduced/mirror/dual to ≤ 1e-8 relative at 20 save times;
    - the mirror identity ∇Q(θ(t)) − ∇Q(θ0) + ∫₀ᵗ ∇f(θ(s)) ds = 0 holds to ≤ 1e-9;
    - the layer flow keeps (u^j)² − (u^k)² at its initial value to ≤ 1e-10.
    """
    runs = _runs(L, problem)
    ref = runs["layer"].theta
    for f, tr in runs.items():
        assert tr.status_name == "success", f
        if f != "layer":  # the others against the ground truth
            assert max_rel_err(tr.theta, ref) <= 1e-8, f
            np.testing.assert_allclose(tr.loss, runs["layer"].loss, rtol=1e-8)
        residual = tr.grad_Q - tr.grad_Q[:1] + tr.grad_integral
        assert float(jnp.max(jnp.abs(residual))) <= 1e-9, f
    # The inits are chosen so that some coordinate of θ changes sign along the way.
    signs = jnp.sign(ref)
    assert bool(jnp.any(signs[0] * signs[-1] < 0))
    assert float(runs["layer"].conservation_drift()) <= 1e-10
    # The loss decreases along the flow.
    assert bool(jnp.all(jnp.diff(runs["reduced"].loss) <= 1e-15))


def test_stop_at_threshold_is_located_exactly(lsq_problem):
    u0 = dj.gaussian_init(jax.random.PRNGKey(3), 3, 30, 0.5)
    eps = 1e-3
    tr = dj.simulate(lsq_problem, u0, t1=200.0, stop_ratio=eps, rtol=1e-10, atol=1e-12)
    f0 = lsq_problem(jnp.prod(u0, axis=0))
    assert tr.status_name == "event"
    # The event is the root of f(θ(t)) = ε f(θ0), not the end of the step that crossed it.
    np.testing.assert_allclose(tr.loss_final, eps * f0, rtol=1e-8)
    assert bool(jnp.all(jnp.isnan(tr.loss[tr.ts > tr.t_final])))
    assert bool(jnp.all(tr.loss[tr.ts <= tr.t_final] > eps * f0))
    # A threshold at the rounding level of f is still found (the root finder cannot meet its
    # tolerance there, the crossing is still located).
    tiny = dj.simulate(lsq_problem, u0, t1=2000.0, stop_ratio=1e-18, rtol=1e-10, atol=1e-12)
    assert tiny.status_name == "event" and tiny.t_final > tr.t_final
    assert abs(float(tiny.loss_final) - 1e-18 * float(f0)) <= 1e-15 * float(f0)  # f's rounding


def test_batch_keeps_per_run_status(lsq_problem):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    u0 = jnp.stack([dj.gaussian_init(k, 3, 30, a) for k, a in zip(keys, [0.3, 0.6, 1.0])])
    batch = dj.simulate(lsq_problem, u0, t1=5.0, ts=jnp.linspace(0, 5, 6), max_steps=60)
    single = dj.simulate(lsq_problem, u0[2], t1=5.0, ts=jnp.linspace(0, 5, 6), max_steps=60)
    assert batch.theta.shape == (3, 6, 30)
    assert list(batch.status_name).count("max_steps") >= 1
    assert str(single.status_name) == batch.status_name[2]
    np.testing.assert_allclose(batch.theta[2], single.theta, rtol=1e-12, equal_nan=True)
    # What a failed lane reached is kept, and its missing saves are NaN, not inf.
    failed = np.flatnonzero(np.asarray(batch.status == dj.Status.max_steps))[0]
    assert float(batch.t_final[failed]) < 5.0
    assert not np.any(np.isinf(np.asarray(batch.theta)))


def test_nonfinite_is_a_status_not_a_crash():
    """A vector field that turns NaN past θ₀ = 0.55 ends the run as `nonfinite`, quickly."""
    loss = lambda th: 0.5 * jnp.sum((th - 1) ** 2) + jnp.where(th[0] > 0.55, jnp.nan, 0.0) * th[0]
    u0 = jnp.array([[0.45, 0.5, 0.5], [0.5, 0.5, 0.5]])
    tr = dj.simulate(loss, u0, t1=5.0, max_steps=5000)
    assert tr.status_name == "nonfinite"
    assert 0.5 < float(tr.theta_final[0]) <= 0.55 and float(tr.t_final) < 5.0
    # A field that is NaN from the start ends after a short streak of rejected steps.
    tr = dj.simulate(lambda th: jnp.sum(jnp.sqrt(th - 1.0)), u0, t1=5.0, max_steps=5000)
    assert tr.status_name == "nonfinite" and int(tr.num_steps) < 100


def test_balanced_init_runs_on_every_formulation(lsq_problem):
    """Without Assumption A, g = L|θ|^{2-2/L} and θ never changes sign; the mirror and dual
    flows use the half-line geometry and agree with the layers."""
    u0 = dj.balanced_init(3, 30, 0.5)
    ts = TS[:5] / 2
    runs = {f: dj.simulate(lsq_problem, u0, t1=3.0, ts=ts, formulation=f, rtol=1e-11, atol=1e-13,
                           solver=dfx.Tsit5())  # not stiff: as in `_runs`
            for f in FORMULATIONS}
    for f in ("reduced", "mirror", "dual"):
        assert runs[f].status_name == "success", f
        assert max_rel_err(runs[f].theta, runs["layer"].theta) <= 1e-8, f
    assert bool(jnp.all(runs["layer"].theta > 0))
