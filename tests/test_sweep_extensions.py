"""Sweep extensions: the signed model, discrete runs and d/dα sensitivities, against single runs
(`simulate`, `train`, `simulate_jvp`), a central difference, and the spec's validation."""

import jax
import numpy as np
import optax
import pytest
import xarray as xr

import ddln_jax as dj
from ddln_jax._problems import make_problem
from ddln_jax._results import StoreError
from ddln_jax._solution import EVENT, SUCCESS, status_codes

PROBLEM = {"kind": "sparse_regression", "n": 4, "d": 6, "sparsity": 2, "seeds": [0]}
SIGNED = {
    "problem": PROBLEM,
    "model": {"kind": "signed"},
    "init": {"scheme": "woodworth", "alpha": [0.3, 0.6]},
    "run": {"depths": [2], "t1": 8.0, "n_save": 5, "stop_ratio": 1e-2},
    "engine": {"lanes": 2},
}


def _loss(raw):
    return make_problem(dj.SweepSpec.from_dict(raw).problem, 0).loss()


def _rel(a, b):
    """Max over save times of ‖a − b‖/‖b‖ where b is recorded (NaN after a stop)."""
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(b[..., 0])
    return float(np.max(np.linalg.norm(a[ok] - b[ok], axis=-1) / np.linalg.norm(b[ok], axis=-1)))


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    out = tmp_path_factory.mktemp("signed")
    return dj.sweep(SIGNED, out, progress=False), out


def test_signed_sweep_equals_simulate(signed):
    """Every run of a signed sweep is `simulate(..., model="signed")` of the Woodworth init."""
    ds, _ = signed
    spec = dj.SweepSpec.from_dict(SIGNED)
    alphas = list(spec.init.alpha)
    u0 = np.stack([dj.woodworth_init(2, 6, a) for a in alphas])
    tr = dj.simulate(_loss(SIGNED), u0, t1=spec.run.t1, ts=spec.save_times, model="signed",
                     stop_ratio=spec.run.stop_ratio, rtol=spec.run.rtol, atol=spec.run.atol)
    run = ds.sel(depth=2, problem=0, shape=1.0, seed=0)
    codes = np.asarray(status_codes(tr.status))
    assert np.all(run.status.values == codes) and np.all(codes == EVENT)
    assert _rel(run.theta.values, tr.theta) <= 1e-8
    np.testing.assert_allclose(run.time_to_eps.values, tr.t_final, rtol=1e-8)
    # θ at the located stop, relative to ‖θ‖ (the two solvers locate the event apart by ~1e-9).
    assert _rel(run.theta_final.values[:, None], np.asarray(tr.theta_final)[:, None]) <= 1e-8
    # θ(t) is still (d,); θ0 = 0 for Woodworth's init; the dataset says which model it holds.
    assert run.theta.shape == (2, 5, 6) and np.abs(run.theta.values[:, 0]).max() <= 1e-15
    assert ds.attrs["model"] == "signed" and ds.attrs["n_failed"] == 0


def test_tied_signed_sweep_equals_simulate(signed):
    """Tied layers: the sweep equals `simulate(..., model="signed_tied")` (L times faster than
    the untied flow of the same init), and a directory of the untied sweep refuses it."""
    ds_untied, out = signed
    raw = {**SIGNED, "model": {"kind": "signed", "tied": True}}
    spec = dj.SweepSpec.from_dict(raw)
    assert spec.digest() != dj.SweepSpec.from_dict(SIGNED).digest()
    with pytest.raises(StoreError, match="different spec"):
        dj.sweep(raw, out, progress=False)
    ds = dj.sweep(raw, progress=False)
    u0 = np.stack([dj.woodworth_init(2, 6, a) for a in spec.init.alpha])
    tr = dj.simulate(_loss(raw), u0, t1=spec.run.t1, ts=spec.save_times, model="signed_tied",
                     stop_ratio=spec.run.stop_ratio, lanes=1)
    run = ds.sel(depth=2, problem=0, shape=1.0, seed=0)
    assert np.all(run.status.values == np.asarray(status_codes(tr.status)))
    assert _rel(run.theta.values, tr.theta) <= 1e-8
    np.testing.assert_allclose(run.time_to_eps.values, tr.t_final, rtol=1e-8)
    # Tied = untied with time scaled by L = 2: ε is reached at half the untied time (to the
    # solvers' tolerance; the two runs take different steps).
    untied = ds_untied.sel(depth=2, problem=0, shape=1.0, seed=0).time_to_eps.values
    np.testing.assert_allclose(run.time_to_eps.values, untied / 2, rtol=1e-6)
    assert ds.attrs["model"] == "signed_tied"


def test_gd_sweep_equals_train(tmp_path):
    """A gd sweep: every (init, η) is `dj.train` of the same init with optax.sgd(η), saved at
    the spec's save times as fractions of the run (k = round(steps·t/t1)), t = k·η; an
    interrupted one resumes to the same dataset."""
    raw = {
        "problem": PROBLEM,
        "init": {"scheme": "gaussian", "alpha": [0.3, 0.8], "seeds": [0, 1]},
        "run": {"depths": [2], "t1": 1.0, "n_save": 4, "method": "gd",
                "learning_rates": [0.05, 0.2], "steps": 90},
        "engine": {"chunk_size": 2},
    }
    ds = dj.sweep(raw, tmp_path, progress=False)
    # Interrupted after one chunk: the other is recomputed, the kept one reused.
    (tmp_path / "results.nc").unlink()
    sorted((tmp_path / "chunks").glob("*.nc"))[0].unlink()
    again = dj.sweep(raw, tmp_path, progress=False)
    xr.testing.assert_identical(again.drop_attrs(), ds.drop_attrs())
    assert dj.load_trajectories(tmp_path, alpha=0.3).dims == ("depth", "problem", "shape", "alpha", "seed", "learning_rate", "time", "coord")
    spec = dj.SweepSpec.from_dict(raw)
    loss = _loss(raw)
    lrs = np.array(spec.run.learning_rates)
    grid = [(a, k) for a in spec.init.alpha for k in spec.init.seeds]
    U = np.stack([np.asarray(dj.gaussian_init(jax.random.fold_in(jax.random.PRNGKey(k), 2), 2, 6, a))
                  for a, k in grid])
    saves = np.array([0, 30, 60, 90])
    np.testing.assert_array_equal(ds.time.values, saves)
    np.testing.assert_allclose(ds.t.values, lrs[:, None] * saves[None, :], rtol=1e-15)
    for lr in lrs:
        tr = dj.train(loss, U, optax.sgd(lr), steps=90, saves=saves)
        codes = np.asarray(status_codes(tr.status))
        for i, (a, k) in enumerate(grid):
            run = ds.sel(depth=2, problem=0, shape=1.0, alpha=a, seed=k, learning_rate=lr)
            assert int(run.status) == int(codes[i]) == SUCCESS
            np.testing.assert_allclose(run.theta.values, tr.theta[i], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(run.loss.values, tr.loss[i], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(run.theta_final.values, tr.theta_final[i], rtol=1e-12, atol=1e-15)
    assert ds.status.dims[-1] == "learning_rate" and ds.attrs["method"] == "gd"


def test_alpha_sensitivities():
    """d/dα of θ(t), θ_final and the time to ε: equal to `simulate_jvp(..., lanes=...)` along
    du0 = u0/α, and to a central difference of the runs at α ± h in the same sweep."""
    a, h = 0.5, 2.5e-4
    raw = {
        "problem": PROBLEM,
        "init": {"scheme": "gaussian", "alpha": [a - h, a, a + h], "seeds": [3]},
        "run": {"depths": [2], "t1": 20.0, "save_times": [0.0, 0.5, 1.0, 20.0], "stop_ratio": 1e-2, "rtol": 1e-12,
                "atol": 1e-14, "sensitivities": ["alpha"]},
        "engine": {"lanes": 1},
    }
    ds = dj.sweep(raw, progress=False)
    spec = dj.SweepSpec.from_dict(raw)
    run = ds.sel(depth=2, problem=0, shape=1.0, seed=3)
    assert np.all(run.status.values == EVENT)
    v = np.asarray(dj.gaussian_init(jax.random.fold_in(jax.random.PRNGKey(3), 2), 2, 6, 1.0))
    U = np.stack([al * v for al in spec.init.alpha])
    tr, dtr = dj.simulate_jvp(_loss(raw), U, U / np.array(spec.init.alpha)[:, None, None], lanes=1,
                              t1=spec.run.t1, ts=spec.save_times, stop_ratio=spec.run.stop_ratio,
                              rtol=spec.run.rtol, atol=spec.run.atol, max_steps=spec.run.max_steps)
    np.testing.assert_allclose(run.theta.values, tr.theta, rtol=1e-10, atol=1e-14)
    rec = ~np.isnan(np.asarray(tr.theta))  # simulate_jvp's tangent is 0 where θ is not recorded
    np.testing.assert_array_equal(~np.isnan(run.dtheta_dalpha.values), rec)
    np.testing.assert_allclose(run.dtheta_dalpha.values[rec], np.asarray(dtr.theta)[rec], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(run.dtheta_final_dalpha.values, dtr.theta_final, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(run.dtime_to_eps_dalpha.values, dtr.t_final, rtol=1e-10)
    # Central differences (tolerances 1e-12: the solver's error over 2h stays below 1e-6).
    lo, mid, hi = (run.sel(alpha=x) for x in spec.init.alpha)
    fd = lambda name: (hi[name].values - lo[name].values) / (2 * h)
    np.testing.assert_allclose(mid.dtheta_final_dalpha.values, fd("theta_final"),
                               rtol=1e-6, atol=1e-6 * np.abs(fd("theta_final")).max())
    np.testing.assert_allclose(float(mid.dtime_to_eps_dalpha), fd("time_to_eps"), rtol=1e-6)
    # θ(t) at the save times before the stop; after it θ and its derivative are not recorded.
    assert np.all(np.isnan(run.dtheta_dalpha.values[:, -1])) and np.all(np.isnan(run.theta.values[:, -1]))
    np.testing.assert_allclose(mid.dtheta_dalpha.values[1:3], fd("theta")[1:3], rtol=1e-6,
                               atol=1e-6 * np.abs(fd("theta")[1:3]).max())


def test_new_keys_change_the_digest_only_when_given():
    base = {"problem": PROBLEM, "run": {"depths": [2]}}
    d0 = dj.SweepSpec.from_dict(base).digest()
    # Default values of the new keys leave a spec's digest (and its stored results) alone.
    same = {**base, "model": {"kind": "product", "tied": False}, "run": {"depths": [2], "method": "flow"}}
    assert dj.SweepSpec.from_dict(same).digest() == d0
    changed = [
        {**base, "model": {"kind": "signed"}, "init": {"scheme": "woodworth"}},
        {**base, "run": {"depths": [2], "sensitivities": ["alpha"]}},
        {**base, "run": {"depths": [2], "method": "gd", "learning_rates": [0.1], "steps": 100}},
        {**base, "run": {"depths": [2], "method": "gd", "learning_rates": [0.1], "steps": 200}},
    ]
    digests = {dj.SweepSpec.from_dict(c).digest() for c in changed}
    assert d0 not in digests and len(digests) == len(changed)


@pytest.mark.parametrize("section, key, value, extra, message", [
    ("model", "kind", "tensor", {}, r"\[model\] kind: must be one of \['product', 'signed'\]"),
    ("model", "tied", "yes", {}, r"\[model\] tied: must be true or false"),
    ("model", "tied", True, {}, r"\[model\] tied: only the signed model"),
    ("init", "scheme", "zero_first", {"model": {"kind": "signed"}}, r"\[init\] scheme: must be one of"),
    ("init", "scheme", "gaussian", {"model": {"kind": "signed", "tied": True}}, r"\[init\] scheme: the tied"),
    ("init", "shape", [2.0], {"model": {"kind": "signed"}, "init": {"scheme": "woodworth"}}, r"\[init\] shape: 'woodworth'"),
    ("run", "method", "newton", {}, r"\[run\] method: must be one of"),
    ("run", "learning_rates", [0.1, 0.0], {"run": {"method": "gd", "steps": 100}}, r"\[run\] learning_rates: must be > 0"),
    ("run", "steps", 0, {"run": {"method": "gd", "learning_rates": [0.1]}}, r"\[run\] steps: must be ≥ 1"),
    ("run", "steps", 2, {"run": {"method": "gd", "learning_rates": [0.1]}}, r"\[run\] steps: 2 steps cannot hold"),
    ("run", "steps", 10, {}, r"\[run\] steps: only used with a discrete method"),
    ("run", "method", "gd", {}, r"\[run\] learning_rates: method = 'gd' needs"),
    ("run", "stop_ratio", 0.1, {"run": {"method": "gd", "learning_rates": [0.1], "steps": 100}}, r"\[run\] stop_ratio: not used"),
    ("run", "method", "gd", {"model": {"kind": "signed"}, "init": {"scheme": "woodworth"}, "run": {"learning_rates": [0.1], "steps": 100}}, r"\[run\] method: discrete runs"),
    ("run", "sensitivities", ["beta"], {}, r"\[run\] sensitivities: must be one of \['alpha'\]"),
    ("run", "sensitivities", ["alpha"], {"run": {"method": "gd", "learning_rates": [0.1], "steps": 100}}, r"\[run\] sensitivities: computed for the flow only"),
    ("run", "sensitivities", ["alpha"], {"init": {"scheme": "custom"}}, r"\[run\] sensitivities: d/dα needs a scheme"),
])
def test_bad_new_keys(section, key, value, extra, message):
    raw = {"problem": PROBLEM, "run": {"depths": [2]}}
    for sec, keys in extra.items():
        raw[sec] = {**raw.get(sec, {}), **keys}
    raw[section] = {**raw.get(section, {}), key: value}
    with pytest.raises(dj.SpecError, match=message):
        dj.SweepSpec.from_dict(raw)
