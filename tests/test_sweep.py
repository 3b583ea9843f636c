"""Sweeps: equality with single runs, storage and resume, specs, devices, the command line."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import ddln_jax as dj
from ddln_jax import _spec, cli
from ddln_jax._problems import make_problem
from ddln_jax._results import StoreError
from ddln_jax._solution import EVENT, MAX_STEPS, status_codes

SMOKE = _spec.tomllib.loads(_spec.spec_text("smoke"))


def make_init(L, d, alpha, seed):
    """The documented gaussian scheme of sweeps: one key per (seed, depth)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), L)
    return np.asarray(dj.gaussian_init(key, L, d, alpha))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    return dj.sweep(SMOKE, out, progress=False), out


def test_sweep_equals_single_runs(smoke):
    """Every lane of the sweep equals `simulate` of the same init (θ(t), time-to-ε, status)."""
    ds, _ = smoke
    spec = dj.SweepSpec.from_dict(SMOKE)
    loss = make_problem(spec.problem, 0).loss()
    for L in spec.run.depths:
        sub = ds.sel(depth=L, problem=0, shape=1.0)
        grid = [(a, k) for a in sub.alpha.values for k in sub.seed.values]
        u0 = np.stack([make_init(L, spec.problem.d, a, k) for a, k in grid])
        tr = dj.simulate(loss, u0, t1=spec.run.t1, ts=spec.save_times, rtol=spec.run.rtol,
                         atol=spec.run.atol, stop_ratio=spec.run.stop_ratio)
        codes = np.asarray(status_codes(tr.status))
        for i, (a, k) in enumerate(grid):
            run = sub.sel(alpha=a, seed=k)
            assert int(run.status) == int(codes[i]) == EVENT
            np.testing.assert_allclose(float(run.time_to_eps), float(tr.t_final[i]), rtol=1e-8)
            ref = np.asarray(tr.theta[i])
            np.testing.assert_array_equal(np.isnan(run.theta.values), np.isnan(ref))
            ok = ~np.isnan(ref[:, 0])
            err = np.linalg.norm(run.theta.values[ok] - ref[ok], axis=1) / np.linalg.norm(ref[ok], axis=1)
            assert err.max() <= 1e-8
            np.testing.assert_allclose(run.theta_final.values, tr.theta_final[i], rtol=1e-8, atol=1e-12)
    # The reduced flow keeps the gaps exactly; the D_Q(θ*, θ(t)) record decreases.
    assert float(ds.conservation_drift.max()) <= 1e-12
    breg = ds.bregman.sel(depth=3).values
    assert np.all(np.diff(breg, axis=-1)[np.isfinite(np.diff(breg, axis=-1))] <= 1e-12)
    assert ds.attrs["n_failed"] == 0 and ds.attrs["spec_digest"] == spec.digest()


def test_finished_sweep_is_loaded_not_recomputed(smoke, monkeypatch):
    ds, out = smoke
    monkeypatch.setattr("ddln_jax._sweep.run_queue", lambda *a, **k: pytest.fail("recomputed"))
    again = dj.sweep(SMOKE, out, progress=False)
    xr.testing.assert_identical(again.drop_attrs(), ds.drop_attrs())
    xr.testing.assert_identical(dj.open_results(out).drop_attrs(), ds.drop_attrs())


def test_changed_spec_is_refused(smoke):
    _, out = smoke
    changed = {**SMOKE, "run": {**SMOKE["run"], "t1": 100.0}}
    with pytest.raises(StoreError, match=f"output directory '{out}' holds results of a different spec"):
        dj.sweep(changed, out, progress=False)
    # How the engine runs (lanes, chunks) does not change the results: not a different spec.
    faster = {**SMOKE, "engine": {"lanes": 3, "chunk_size": 4}}
    assert dj.SweepSpec.from_dict(faster).digest() == dj.SweepSpec.from_dict(SMOKE).digest()


def test_failed_runs_are_marked_and_kept(smoke):
    # A step budget that the harder half of the runs exceeds.
    budget = int(np.median(smoke[0].steps.values))
    ds = dj.sweep({**SMOKE, "run": {**SMOKE["run"], "max_steps": budget}}, progress=False)
    status = ds.status.values
    assert np.any(status == MAX_STEPS) and np.any(status == EVENT)
    assert ds.attrs["n_failed"] == int(np.sum(status == MAX_STEPS))
    failed = ds.where(ds.status == MAX_STEPS)
    assert np.all(failed.steps.values[np.isfinite(failed.steps.values)] == budget)
    kept = ds.status == EVENT
    xr.testing.assert_allclose(ds.time_to_eps.where(kept), smoke[0].time_to_eps.where(kept))
    assert f"{ds.attrs['n_failed']} failed" in dj.summary(ds)


def _write_spec(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_four_cpu_devices_give_the_same_results(tmp_path):
    script = textwrap.dedent(
        """
        import jax, numpy as np, tomllib
        jax.config.update("jax_enable_x64", True)
        import ddln_jax as dj
        from ddln_jax import _spec
        assert len(jax.devices()) == 4, jax.devices()
        spec = tomllib.loads(_spec.spec_text("smoke"))
        spec["run"]["depths"] = [2]
        spec["problem"].update(n=6, d=8)
        one = dj.sweep(spec, progress=False, devices=jax.devices()[:1])
        four = dj.sweep(spec, progress=False, devices=jax.devices())
        assert four.attrs["devices"] == 4 and one.attrs["devices"] == 1
        # One device and four run the lanes in different programs (plain and sharded), whose
        # products round differently; the adaptive solve carries that rounding to about 1e-11
        # of θ's scale (measured: 1.7e-11 in θ_final, at a coordinate of 0.016). So: agree to
        # the spec's rtol (1e-10) relative to each quantity's scale.
        for name in ["theta", "loss", "time_to_eps", "theta_final", "bregman"]:
            a, b = one[name].values, four[name].values
            assert np.array_equal(np.isnan(a), np.isnan(b)), name
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * np.nanmax(np.abs(b)),
                                       err_msg=name)
        assert np.array_equal(one.status.values, four.status.values)
        # The sharded engine is compiled once per configuration, not once per call.
        from ddln_jax import _engine
        n = len(_engine._SHARDED_PROGRAMS)
        dj.sweep(spec, progress=False, devices=jax.devices())
        assert len(_engine._SHARDED_PROGRAMS) == n == 1
        print("OK", float(np.nanmax(np.abs(one.theta.values - four.theta.values))))
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_cli_default_sweep_at_reduced_size(smoke, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["sweep", "--smoke", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "median time-to-eps" in text and "12 runs, 0 failed" in text
    for fig in ["loss_curves.png", "time_to_eps.png"]:
        assert (out / fig).stat().st_size > 10_000
        (out / fig).unlink()
    assert cli.main(["plot", str(out)]) == 0
    assert (out / "loss_curves.png").exists() and (out / "time_to_eps.png").exists()
    assert cli.main(["spec"]) == 0 and "[problem]" in capsys.readouterr().out


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"run": {"depths": []}}, r"\[run\] depths: must not be empty"),
        ({"run": {"depths": [0, 2]}}, r"\[run\] depths: must be ≥ 1, got 0"),
        ({"run": {"depths": "3"}}, r"\[run\] depths: must be an integer, got '3'"),
        ({"init": {"alpha": [0.5, -1.0]}}, r"\[init\] alpha: must be > 0, got -1.0"),
        ({"init": {"alpha": {"geomspace": [0.0, 1.0, 3]}}}, r"\[init\] alpha: must be > 0, got 0.0"),
        ({"init": {"alhpa": [1.0]}}, r"\[init\] alhpa: unknown key"),
        ({"solver": {"name": "x"}}, r"\[solver\]: unknown section"),
        ({"run": {"t1": "long"}}, r"\[run\] t1: must be a number, got 'long'"),
        ({"run": {"stop_ratio": 2.0}}, r"\[run\] stop_ratio: must be in \(0, 1\), got 2.0"),
        ({"problem": {"kind": "ridge"}}, r"\[problem\] kind: must be one of"),
        ({"problem": {"d": 3, "sparsity": 5}}, r"\[problem\] sparsity: must be ≤ d = 3"),
        ({"run": {"max_steps": 2**31}}, r"\[run\] max_steps: must be ≤ 2147483647"),
        ({"run": {"rtol": 10.0}}, r"\[run\] rtol: must be ≤ 0.01, got 10"),
        ({"run": {"atol": 1.0}}, r"\[run\] atol: must be ≤ 0.01, got 1"),
        ({"init": {"alpha": {"geomspace": [0.1, 1.0, 30_000_000]}}}, r"\[init\] alpha: must be ≤ 1000000"),
        ({"run": {"n_save": 30_000_000}}, r"\[run\] n_save: must be ≤ 1000000"),
        ({"engine": {"lanes": 0}}, r"\[engine\] lanes: must be ≥ 1, got 0"),
        ({"problem": {"kind": "custom"}}, r"\[problem\] n: not used with kind = 'custom'"),
    ],
)
def test_malformed_specs_name_the_file_and_key(tmp_path, patch, match):
    raw = {k: dict(v) for k, v in SMOKE.items()}
    for section, values in patch.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "bad.toml"
    path.write_text(_to_toml(raw))
    with pytest.raises(dj.SpecError, match=f"^{path}: " + match):
        dj.SweepSpec.load(path)


def _to_toml(raw):
    import json

    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{{inner}}}")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def test_bad_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[run\ndepths = [2]\n")
    with pytest.raises(dj.SpecError, match=f"^{path}: not valid TOML"):
        dj.SweepSpec.load(path)
    with pytest.raises(dj.SpecError, match="cannot read the spec"):
        dj.SweepSpec.load(tmp_path / "missing.toml")


def test_unwritable_output_is_refused_before_any_compute(tmp_path, monkeypatch):
    monkeypatch.setattr("ddln_jax._sweep.run_queue", lambda *a, **k: pytest.fail("computed"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=f"output directory '{blocker / 'out'}' is not writable"):
        dj.sweep(SMOKE, blocker / "out", progress=False)
    assert cli.main(["sweep", "--smoke", "--out", str(blocker / "out"), "--quiet"]) == 2


def test_sweeps_need_float64(monkeypatch):
    monkeypatch.setattr(jax.config, "read", lambda name: False if name == "jax_enable_x64" else None)
    with pytest.raises(ValueError, match="sweeps run in float64"):
        dj.sweep(SMOKE, progress=False)


def test_sweeps_too_large_for_memory_keep_trajectories_on_disk(smoke, tmp_path, monkeypatch):
    """Past the memory budget, θ(t) stays in the chunk files and is read back by selection."""
    monkeypatch.setattr("ddln_jax._sweep._THETA_BYTES", 1000)
    with pytest.raises(ValueError, match="give an output directory"):
        dj.sweep(SMOKE, progress=False)
    ds = dj.sweep(SMOKE, tmp_path / "big", progress=False)
    assert "theta" not in ds and "theta_final" in ds and "chunk files" in ds.attrs["theta_trajectories"]
    theta = dj.load_trajectories(tmp_path / "big", depth=3, alpha=1.0)
    ref = smoke[0].theta.sel(depth=[3], alpha=[1.0])
    np.testing.assert_array_equal(theta.values, ref.values)


def test_user_data_sweep_equals_the_generated_problem(smoke, tmp_path):
    """kind = "data" with the smoke problem's X and y reproduces the smoke sweep."""
    ds, _ = smoke
    np.savez(tmp_path / "data.npz", X=ds.X.sel(problem=0).values, y=ds.y.sel(problem=0).values)
    spec = _spec.spec_text("smoke").replace('kind = "sparse_regression"', 'kind = "data"\npath = "data.npz"')
    spec = "\n".join(line for line in spec.splitlines() if not line.startswith(("n =", "d =", "sparsity =")))
    path = _write_spec(tmp_path / "data.toml", spec)
    mine = dj.sweep(path, progress=False)
    np.testing.assert_allclose(mine.time_to_eps.values, ds.time_to_eps.values, rtol=1e-12)
    np.testing.assert_allclose(mine.theta.values, ds.theta.values, rtol=1e-12, atol=1e-15)


def test_logistic_sweep(tmp_path):
    """Logistic problems: separable draws have f* = 0, runs stop at ε f(θ0), no D_Q."""
    spec = {**SMOKE, "problem": {**SMOKE["problem"], "kind": "logistic"},
            "run": {**SMOKE["run"], "depths": [2], "stop_ratio": 0.1}}
    ds = dj.sweep(spec, progress=False)
    assert "bregman" not in ds and "logistic" in ds.attrs["bregman"]
    assert ds.f_star.values.tolist() == [0.0] and np.isnan(ds.pl_mu.values).all()
    assert np.all(ds.status.values == EVENT)
    np.testing.assert_allclose(ds.loss_final, 0.1 * ds.f0, rtol=1e-8)


def test_changed_user_data_is_a_different_spec(smoke, tmp_path):
    ds, _ = smoke
    np.savez(tmp_path / "data.npz", X=ds.X.sel(problem=0).values, y=ds.y.sel(problem=0).values)
    text = {"problem": {"kind": "data", "path": str(tmp_path / "data.npz")}}
    before = dj.SweepSpec.from_dict({**SMOKE, **text}).digest()
    np.savez(tmp_path / "data.npz", X=ds.X.sel(problem=0).values, y=10 * ds.y.sel(problem=0).values)
    assert dj.SweepSpec.from_dict({**SMOKE, **text}).digest() != before


def test_log_spaced_saves_end_at_t1():
    for n in (2, 5):
        spec = dj.SweepSpec.from_dict({**SMOKE, "run": {**SMOKE["run"], "n_save": n, "save_spacing": "log"}})
        assert spec.save_times[0] == 0 and spec.save_times[-1] == SMOKE["run"]["t1"] and len(spec.save_times) == n


def test_theory_table_on_a_real_sweep(smoke):
    """time_to_eps_table on the sweep's own dataset: every run beats its PL-bound time, and
    reading time-to-ε off the saved loss at a larger ε gives earlier times."""
    ds, _ = smoke
    table = dj.time_to_eps_table(ds)
    assert float(table.ratio.max()) <= 1.0 and np.all(table.reached_fraction.values == 1)
    np.testing.assert_allclose(table.time_to_eps.values, ds.time_to_eps.values, rtol=1e-12)
    looser = dj.time_to_eps_table(ds, eps=1e-2)
    assert np.all(looser.time_to_eps.values < table.time_to_eps.values)


def test_shipped_specs_are_package_data():
    from importlib.resources import files

    assert dj.SweepSpec.smoke() == dj.SweepSpec.from_dict(SMOKE)
    assert dj.SweepSpec.default().count() == 3 * 6 * 4
    assert files("ddln_jax").joinpath("specs", "default.toml").is_file()


def test_in_memory_loss_and_inits_equal_the_spec_sweep(smoke, tmp_path):
    """`sweep(spec, loss=..., inits=...)` with the smoke problem and its depth-2 inits gives
    the smoke sweep's runs; the dataset is labelled by `init`; the digest covers the arrays."""
    ds, _ = smoke
    X, y = ds.X.sel(problem=0).values, ds.y.sel(problem=0).values
    grid = [(a, k) for a in ds.alpha.values for k in ds.seed.values]
    u0 = np.stack([make_init(2, X.shape[1], a, k) for a, k in grid])
    raw = {"problem": {"kind": "custom"}, "init": {"scheme": "custom"},
           "run": {**SMOKE["run"], "depths": [2]}, "engine": SMOKE["engine"]}
    mine = dj.sweep(raw, tmp_path / "custom", loss=dj.LeastSquares(X, y), inits=u0, progress=False)
    assert mine.time_to_eps.dims == ("depth", "problem", "init")
    ref = ds.sel(depth=[2], problem=[0], shape=1.0)
    np.testing.assert_allclose(mine.time_to_eps.values.ravel(), ref.time_to_eps.values.ravel(), rtol=1e-12)
    np.testing.assert_allclose(mine.theta.values[0, 0], ref.theta.values[0, 0].reshape(6, *mine.theta.shape[3:]),
                               rtol=1e-12, atol=1e-15)
    # D_Q is taken from the least-squares minimum-norm minimizer (the planted θ* is unknown).
    np.testing.assert_allclose(mine.theta_min.values[0], np.linalg.lstsq(X, y, rcond=None)[0], rtol=1e-12)
    theta_min = mine.theta_min.values[0]
    expect = [float(dj.Geometry(u).bregman(theta_min, np.prod(u, axis=0))) for u in u0]
    np.testing.assert_allclose(mine.bregman.values[0, 0, :, 0], expect, rtol=1e-10)  # at t = 0
    # Other data under the same directory: refused (the loss's arrays are in the digest).
    with pytest.raises(StoreError, match="different spec"):
        dj.sweep(raw, tmp_path / "custom", loss=dj.LeastSquares(X, 2 * y), inits=u0, progress=False)
    # A function loss (its bytecode, not its address, is hashed), inits for two depths.
    f = lambda th: 0.5 * jnp.sum((th - 1.0) ** 2)
    two = {2: u0[:2], 3: np.stack([make_init(3, X.shape[1], 0.5, k) for k in (0, 1)])}
    raw2 = {**raw, "run": {**raw["run"], "depths": [2, 3], "stop_ratio": 0.1}}
    fn = dj.sweep(raw2, loss=dj.CallableLoss(f, X.shape[1]), inits=two, progress=False)
    assert fn.sizes["init"] == 2 and np.all(fn.status.values == EVENT)
    assert "bregman" not in fn and np.all(np.isnan(fn.f_star.values))
    with pytest.raises(dj.SpecError, match="kind = 'custom' needs the loss"):
        dj.sweep(raw, inits=u0, progress=False)
    with pytest.raises(dj.SpecError, match="needs kind = 'custom'"):
        dj.sweep(SMOKE, loss=dj.LeastSquares(X, y), progress=False)
    with pytest.raises(dj.SpecError, match="the inits are given for depths \\[2\\]"):
        dj.sweep(raw2, loss=dj.LeastSquares(X, y), inits=u0, progress=False)
    with pytest.raises(ValueError, match="must have shape"):
        dj.sweep(raw, loss=dj.LeastSquares(X, y), inits={2: u0[:, :1]}, progress=False)


def test_to_dict_round_trips_every_kind_of_spec(tmp_path):
    """`from_dict(spec.to_dict())` rebuilds the spec and its digest: generated, data, custom,
    discrete, signed, sensitivities, log-spaced saves."""
    np.savez(tmp_path / "data.npz", X=np.eye(3, 5), y=np.ones(3))
    run = SMOKE["run"]
    variants = [
        SMOKE,
        {**SMOKE, "problem": {"kind": "data", "path": str(tmp_path / "data.npz")}},
        {**SMOKE, "problem": {"kind": "custom"}, "init": {"scheme": "custom"}},
        {**SMOKE, "run": {**{k: v for k, v in run.items() if k != "stop_ratio"}, "method": "gd",
                          "learning_rates": [0.01, 0.02], "steps": 400}},
        {**SMOKE, "model": {"kind": "signed", "tied": True}, "init": {"scheme": "woodworth", "alpha": [0.1]}},
        {**SMOKE, "run": {**run, "sensitivities": ["alpha"], "stop_ratio": 0.01}},
        {**SMOKE, "run": {**run, "n_save": 5, "save_spacing": "log"}},
    ]
    for raw in variants:
        spec = dj.SweepSpec.from_dict(raw)
        again = dj.SweepSpec.from_dict(spec.to_dict())
        assert again == spec and again.digest() == spec.digest(), raw
    assert dj.SweepSpec.default() == dj.SweepSpec.from_dict(dj.SweepSpec.default().to_dict())
