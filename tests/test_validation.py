"""Bad input gets a ValueError/TypeError naming the argument and the value, before compiling."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddln_jax as dj

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def small():
    X = jax.random.normal(KEY, (3, 5))
    return dj.LeastSquares(X, X @ jnp.ones(5)), dj.gaussian_init(KEY, 3, 5, 0.5)


@pytest.mark.parametrize(
    "u0, match",
    [
        (np.ones(5), r"`u0` must have 2 or 3 dimension\(s\), got shape \(5,\)"),
        (np.ones((1, 2, 3, 5)), r"`u0` must have 2 or 3 dimension"),
        (np.ones((0, 5)), r"`u0` must have L ≥ 1 layers"),
        (np.array([[1.0, np.nan, 1, 1, 1]] * 2), r"`u0` must be finite.*index \(0, 1\)"),
        (np.ones((2, 4)), r"`loss` expects θ of dimension 5, but `u0` has d = 4"),
    ],
)
def test_bad_layers(small, u0, match):
    with pytest.raises(ValueError, match=match):
        dj.simulate(small[0], u0, t1=1.0)


def test_bad_layer_type(small):
    with pytest.raises(TypeError, match="`u0` must be an array of real numbers"):
        dj.simulate(small[0], "layers", t1=1.0)


@pytest.mark.parametrize(
    "X, y, match",
    [
        (np.ones((3, 5)) * np.nan, np.ones(3), "`X` must be finite"),
        (np.ones((3, 5)), np.array([1.0, np.inf, 0]), "`y` must be finite"),
        (np.ones((3, 5)), np.ones(4), "same number of rows"),
        (np.ones(5), np.ones(3), r"`X` must have 2 dimension"),
    ],
)
def test_bad_data(X, y, match):
    with pytest.raises(ValueError, match=match):
        dj.LeastSquares(X, y)


def test_logistic_labels():
    with pytest.raises(ValueError, match=r"`y` must hold labels in \{-1, \+1\}, got values \[0.0"):
        dj.Logistic(np.ones((3, 2)), np.array([0.0, 1.0, 1.0]))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: dj.gaussian_init(KEY, 3, 4, 0.0), r"`alpha` must be finite and > 0, got 0.0"),
        (lambda: dj.balanced_init(3, 4, -1.0), r"`alpha` must be finite and > 0, got -1.0"),
        (lambda: dj.zero_first_init(3, 4, float("nan")), r"`alpha` must be finite and > 0"),
        (lambda: dj.gaussian_init(KEY, 0, 4, 1.0), r"`L` must be an integer ≥ 1, got 0"),
        (lambda: dj.gaussian_init(KEY, 2, 0, 1.0), r"`d` must be an integer ≥ 1, got 0"),
        (lambda: dj.layered_init([1.0, -0.5], 4), r"`scales` must be > 0, got \[1.0, -0.5\]"),
    ],
)
def test_bad_inits(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_depth_must_be_an_integer():
    with pytest.raises(TypeError, match="`L` must be an integer, got 2.5"):
        dj.gaussian_init(KEY, 2.5, 4, 1.0)


@pytest.mark.parametrize("formulation", ["mirror", "dual"])
def test_partial_ties_refused_for_mirror_and_dual(small, formulation):
    """Balanced coordinates have the half-line geometry; a tie of the two smallest layers
    under a larger one has no potential, and is refused before compiling."""
    u0 = dj.gaussian_init(KEY, 3, 5, 0.5).at[:, 2].set(jnp.array([0.2, -0.2, 0.5]))
    with pytest.raises(ValueError, match=r"no computable mirror geometry \(partial tie at coordinates \[2\]\)"):
        dj.simulate(small[0], u0, t1=1.0, formulation=formulation)
    U = jnp.stack([dj.gaussian_init(KEY, 3, 5, 0.5), u0])
    with pytest.raises(ValueError, match=r"partial tie at \(init, coordinate\) \[\(1, 2\)\]"):
        dj.simulate(small[0], U, t1=1.0, formulation=formulation)


def test_partial_ties_refused_for_geometric_saves(small):
    u0 = dj.gaussian_init(KEY, 3, 5, 0.5).at[:, 2].set(jnp.array([0.2, -0.2, 0.5]))
    with pytest.raises(ValueError, match="saving \\['grad_Q'\\]"):
        dj.simulate(small[0], u0, t1=1.0, save=("grad_Q",))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(rtol=10.0), ValueError, r"`rtol` must be < 1"),
        (dict(rtol=1e8), ValueError, r"`rtol` must be < 1"),
        (dict(atol=2.0), ValueError, r"`atol` must be < 1"),
        (dict(stop_ratio=0.1, f_star=float("nan")), ValueError, r"`f_star` must be finite"),
        (dict(stop_ratio=0.1, f_star="0"), TypeError, r"`f_star` must be a real number"),
        (dict(ts="huge"), ValueError, r"would take 17.9 GiB .* over the 8 GiB limit"),
    ],
)
def test_bad_run_options(small, kwargs, exc, match):
    loss, u0 = small
    if "ts" in kwargs:  # sized before anything is allocated: a (B, n, d) save that is too big
        u0 = jnp.broadcast_to(u0, (2000,) + u0.shape)
        kwargs = dict(ts=np.linspace(0, 1, 200_000))
    with pytest.raises(exc, match=match):
        dj.simulate(loss, u0, t1=1.0, **kwargs)


def test_empty_batch_refused(small):
    with pytest.raises(ValueError, match=r"`u0` must hold at least one init"):
        dj.simulate(small[0], np.zeros((0, 3, 5)), t1=1.0)


def test_float32_tolerance(small):
    loss, u0 = small
    loss32 = dj.LeastSquares(loss.X.astype(jnp.float32), loss.y.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"`rtol`=1e-10 is below what float32 can deliver"):
        dj.simulate(loss32, u0.astype(jnp.float32), t1=1.0, rtol=1e-10)
    # The float32 defaults are float32-sized and the run stays in float32.
    tr = dj.simulate(loss32, u0.astype(jnp.float32), t1=1.0, ts=jnp.linspace(0, 1, 3))
    assert tr.theta.dtype == jnp.float32 and tr.status_name == "success"
    # A float32 run stopped at a loss threshold (under jax_enable_x64 this failed to trace):
    # it stops where the float64 run does, to float32's tolerances (rtol 1e-5).
    kw = dict(t1=100.0, stop_ratio=1e-3)
    tr32 = dj.simulate(loss32, u0.astype(jnp.float32), **kw)
    tr64 = dj.simulate(loss, u0, **kw)
    assert tr32.status_name == tr64.status_name == "event"
    assert tr32.theta_final.dtype == jnp.float32
    assert abs(float(tr32.t_final) - float(tr64.t_final)) < 1e-4 * float(tr64.t_final)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"t1": 0.0}, ValueError, r"`t1` must be finite and > 0, got 0.0"),
        ({"t1": 1.0, "ts": [0.0, 2.0]}, ValueError, r"`ts` must be increasing save times in \[0, t1=1.0\]"),
        ({"t1": 1.0, "formulation": "euler"}, ValueError, r"`formulation` must be one of .* got 'euler'"),
        ({"t1": 1.0, "save": ("theta_dot",)}, ValueError, r"`save` entries must be among .* \['theta_dot'\]"),
        ({"t1": 1.0, "save": ("bregman",)}, ValueError, r"`theta_star` is required"),
        ({"t1": 1.0, "stop_ratio": 1.5}, ValueError, r"`stop_ratio` must be in \(0, 1\), got 1.5"),
        ({"t1": 1.0, "rtol": -1.0}, ValueError, r"`rtol` must be finite and > 0, got -1.0"),
        ({"t1": 1.0, "max_steps": 0}, ValueError, r"`max_steps` must be an integer ≥ 1, got 0"),
        ({"t1": 1.0, "max_steps": 2**31}, ValueError, r"`max_steps` must be an integer ≤ 2147483647"),
        ({"t1": 1.0, "solver": "tsit5"}, TypeError, r"`solver` must be a diffrax solver, got 'tsit5'"),
        ({"t1": 1.0, "stepsize_controller": dfx.ConstantStepSize()}, ValueError, r"`dt0` is required"),
    ],
)
def test_bad_options(small, kwargs, error, match):
    with pytest.raises(error, match=match):
        dj.simulate(small[0], small[1], **kwargs)


def test_bad_losses(small):
    with pytest.raises(TypeError, match="`loss` must be a ddln_jax loss .* got int"):
        dj.simulate(3, small[1], t1=1.0)
    with pytest.raises(TypeError, match=r"`loss` must return a real scalar for θ of shape \(5,\)"):
        dj.simulate(lambda th: th**2, small[1], t1=1.0)


def test_assumption_a_report():
    u0 = np.array([[1.0, 0.5, -2.0], [1.0, 0.7, 2.5], [3.0, 0.5, 4.0]])
    report = dj.check_assumption_a(u0)
    assert not report.holds and report.tied.tolist() == [0, 1]
    np.testing.assert_allclose(report.min_gap, [0.0, 0.0, 2.25])
    assert dj.check_assumption_a(dj.zero_first_init(4, 3, 0.5)).holds
