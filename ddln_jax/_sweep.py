"""Sweeps: initializations × depths × problems as a labeled dataset, chunk by chunk.

Each depth is its own compiled engine (shapes change with L); each (depth, problem) pair is
split into chunks of runs, dealt hardest first to the lanes of the engine; each finished
chunk is written to disk before the next starts, so an interrupted sweep resumes where it
stopped.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from ._batch import difficulty, lanes_for, run_queue
from ._engine import EngineConfig
from ._flows import as_formulation
from ._init import check_assumption_a
from ._problems import Problem, make_problem
from ._results import ResultStore, load_dataset
from ._simulate import Status
from ._spec import SpecError, SweepSpec
from ._theory import c0 as theory_c0

_SOLVERS = {
    "tsit5": dfx.Tsit5,
    "dopri5": dfx.Dopri5,
    "dopri8": dfx.Dopri8,
    "bosh3": dfx.Bosh3,
    "heun": dfx.Heun,
}
# Memory allowed for one chunk's saved trajectories (θ at every save time).
_CHUNK_BYTES = 512 * 2**20
# Above this, θ(t) of all runs is not assembled in memory: it stays in the chunk files.
_THETA_BYTES = 2 * 2**30
JOB_DIMS = ("depth", "problem", "shape", "alpha", "seed")


def as_spec(spec) -> SweepSpec:
    if isinstance(spec, SweepSpec):
        return spec
    if isinstance(spec, dict):
        return SweepSpec.from_dict(spec)
    if isinstance(spec, (str, Path)):
        return SweepSpec.load(spec)
    raise TypeError(f"`spec` must be a SweepSpec, a dict or a path to a TOML file, got {type(spec).__name__}")


def make_init(scheme: str, L: int, d: int, alpha: float, seed: int, shape: float) -> np.ndarray:
    """The init of one run: `scheme` at scale α, first layer scaled by `shape`.

    Gaussian inits of one seed share their direction across α (u = α·v with v ~ N(0, 1) from
    the seed and the depth), so an α grid is an exact rescaling of one draw.
    """
    if scheme == "gaussian":
        key = jax.random.fold_in(jax.random.PRNGKey(seed), L)
        u = alpha * np.asarray(jax.random.normal(key, (L, d), dtype=jnp.float64))
    elif scheme == "zero_first":
        u = np.full((L, d), alpha)
        u[0] = 0.0
    else:
        u = np.full((L, d), alpha)
    u[0] *= shape
    return u


def _jobs(spec: SweepSpec):
    seeds = spec.init.seeds if spec.init.scheme == "gaussian" else spec.init.seeds[:1]
    return [(s, a, k) for s in spec.init.shape for a in spec.init.alpha for k in seeds]


def _versions():
    out = {}
    for pkg in ("ddln_jax", "jax", "jaxlib", "diffrax", "equinox", "xarray", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            out[pkg] = "unknown"
    return out


def _problems_dataset(spec, problems: list[Problem]) -> xr.Dataset:
    losses = [p.loss() for p in problems]
    f_star = [lo.minimum() for lo in losses]
    pl = [lo.pl_constant() for lo in losses]
    return xr.Dataset(
        {
            "X": (("problem", "row", "coord"), np.stack([p.X for p in problems])),
            "y": (("problem", "row"), np.stack([p.y for p in problems])),
            "theta_star": (("problem", "coord"), np.stack([p.theta_star for p in problems])),
            "theta_min": (("problem", "coord"), np.stack([p.theta_min for p in problems])),
            "f_star": (("problem",), np.array([np.nan if f is None else f for f in f_star], float)),
            "pl_mu": (("problem",), np.array([np.nan if m is None else m for m in pl], float)),
        },
        coords={"problem": list(spec.problem.seeds)},
    )


def _check_inits(spec: SweepSpec, d: int) -> tuple[bool, str]:
    """Refuse inits that the formulation cannot handle; say whether D_Q can be recorded."""
    needs_a = as_formulation(spec.run.formulation).needs_assumption_a
    ok_all = True
    for L in spec.run.depths:
        for shape, alpha, seed in _jobs(spec):
            u0 = make_init(spec.init.scheme, L, d, alpha, seed, shape)
            if not check_assumption_a(u0).holds:
                if needs_a:
                    raise SpecError(
                        f"{spec.source}: [init]: the {spec.init.scheme!r} init (depth {L}, "
                        f"α={alpha:g}, shape={shape:g}) violates Assumption A, which "
                        f"formulation {spec.run.formulation!r} needs; use 'reduced'"
                    )
                ok_all = False
    if spec.problem.kind == "logistic":
        return False, "not recorded: logistic loss has no minimizer"
    if not ok_all:
        return False, "not recorded: some inits violate Assumption A (Q undefined)"
    return True, "D_Q(theta_min, theta(t))"


def _chunks(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def _chunk_dataset(spec, L, p_seed, jobs, idx, out, stats, f0, c0, bregman) -> xr.Dataset:
    ts = spec.save_times
    status = out.status
    t_final = out.t_final
    data = {
        "depth": ("run", np.full(len(idx), L)),
        "problem": ("run", np.full(len(idx), p_seed)),
        "shape": ("run", np.array([jobs[i][0] for i in idx], float)),
        "alpha": ("run", np.array([jobs[i][1] for i in idx], float)),
        "seed": ("run", np.array([jobs[i][2] for i in idx])),
        "status": ("run", status.astype(np.int32)),
        "steps": ("run", out.steps.astype(np.int64)),
        "rejected_steps": ("run", out.rejected.astype(np.int64)),
        "t_final": ("run", t_final),
        "time_to_eps": ("run", np.where(status == Status.EVENT, t_final, np.nan)),
        "loss_final": ("run", out.loss_final),
        "f0": ("run", f0),
        "c0": ("run", c0),
        "conservation_drift": ("run", out.drift),
        "loss": (("run", "time"), out.loss),
        "theta": (("run", "time", "coord"), out.theta),
        "theta_final": (("run", "coord"), out.theta_final),
    }
    if bregman:
        data["bregman"] = (("run", "time"), out.bregman)
    ds = xr.Dataset(data, coords={"time": ts})
    ds.attrs.update({k: float(v) if isinstance(v, float) else int(v) for k, v in stats.items()})
    return ds


def sweep(spec, out=None, *, progress: bool = True, devices=None) -> xr.Dataset:
    """Run a sweep of initializations × depths × problems.

    **Arguments:**

    - `spec`: a [`ddln_jax.SweepSpec`][], a dict, or the path of a TOML spec (see
      `ddln_jax/_spec.py` for the keys).
    - `out`: a results directory. Finished chunks are written there as they complete; a rerun
      with the same spec resumes (a finished sweep is just loaded), a different spec is
      refused. Without it the sweep runs in memory.
    - `progress`: show a progress bar over runs, with an ETA.
    - `devices`: the devices to shard the lanes over (default from the spec: all).

    **Returns:** an `xarray.Dataset` with dimensions `depth`, `problem`, `shape`, `alpha`,
    `seed`, `time`, `coord` (and `row` for the data): `loss`, `theta`, `bregman` (when
    defined), `theta_final`, `time_to_eps`, `status`, `steps`, `t_final`, `f0`, `c0`,
    `conservation_drift`, the problems (`X`, `y`, `theta_star`, `theta_min`, `f_star`,
    `pl_mu`); attributes hold the spec, the package versions and engine statistics.
    """
    spec = as_spec(spec)
    if not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "sweeps run in float64: call `jax.config.update('jax_enable_x64', True)` first "
            "(the `ddln` command does)"
        )
    store = ResultStore(out, spec) if out is not None else None
    if store is not None and store.final_path.exists():
        return load_dataset(store.final_path)
    if devices is None:
        devices = jax.devices()
        if spec.engine.devices != "all":
            if spec.engine.devices > len(devices):
                raise SpecError(f"{spec.source}: [engine] devices: {spec.engine.devices} requested, {len(devices)} available")
            devices = devices[: spec.engine.devices]
    problems = [make_problem(spec.problem, s) for s in spec.problem.seeds]
    d = problems[0].X.shape[1]
    bregman, bregman_note = _check_inits(spec, d)
    problems_ds = _problems_dataset(spec, problems)
    if store is not None:
        store.write_problems(problems_ds)

    jobs = _jobs(spec)
    n_save = len(spec.save_times)
    theta_bytes = 8 * spec.count() * n_save * d
    keep_theta = theta_bytes <= _THETA_BYTES
    if not keep_theta and store is None:
        raise ValueError(
            f"this sweep's θ(t) takes {theta_bytes / 2**30:.1f} GiB: give an output directory, "
            "where it is kept chunk by chunk (`load_trajectories` reads it back)"
        )
    chunk = max(1, min(spec.engine.chunk_size, _CHUNK_BYTES // (8 * n_save * d)))
    bar = _progress(spec.count(), progress)
    pieces, stats_all = [], []
    form = as_formulation(spec.run.formulation)
    solver = _SOLVERS[spec.run.solver]()
    try:
        size = min(chunk, len(jobs))
        lanes = lanes_for(spec.engine.lanes, size, len(devices))
        for L in spec.run.depths:
            config = EngineConfig(
                formulation=form, solver=solver, lanes=lanes, n_save=n_save,
                stop=spec.run.stop_ratio is not None,
                bregman=bregman, round_steps=2000,
            )
            inits = np.stack([make_init(spec.init.scheme, L, d, a, k, s) for s, a, k in jobs])
            order = np.argsort(-difficulty(inits), kind="stable")
            for p_index, prob in enumerate(problems):
                p_seed = spec.problem.seeds[p_index]
                loss = prob.loss()
                f_star = float(problems_ds.f_star[p_index])
                f_star = 0.0 if not np.isfinite(f_star) else f_star
                theta0 = np.prod(inits, axis=1)
                f0 = np.asarray(jax.vmap(loss)(jnp.asarray(theta0)))
                ratio = spec.run.stop_ratio or 0.0
                targets = f_star + ratio * (f0 - f_star)
                theta_min = np.nan_to_num(prob.theta_min)
                for c, idx in enumerate(_chunks(order, chunk)):
                    # The chunk size is in the name: a resume with another chunk size must not
                    # take old chunks for new ones (they hold other runs).
                    name = f"L{L}_p{p_seed}_n{chunk}_c{c:04d}"
                    if store is not None and store.has_chunk(name):
                        piece = store.load_chunk(name)
                        pieces.append(piece if keep_theta else piece.drop_vars("theta"))
                        bar.update(len(idx))
                        continue
                    done = [0]

                    def on_jobs(n, done=done):
                        bar.update(n - done[0])
                        done[0] = n

                    res, stats = run_queue(
                        config, loss, inits[idx], targets[idx], ts=spec.save_times,
                        t1=spec.run.t1, rtol=spec.run.rtol, atol=spec.run.atol,
                        max_steps=spec.run.max_steps, theta_star=theta_min, devices=devices,
                        size=size, on_jobs=on_jobs,
                    )
                    bar.update(len(idx) - done[0])
                    c0 = np.asarray(theory_c0(inits[idx]))
                    ds = _chunk_dataset(spec, L, p_seed, jobs, idx, res, stats, f0[idx], c0, bregman)
                    if store is not None and store.writer:
                        store.write_chunk(name, ds)
                    pieces.append(ds if keep_theta else ds.drop_vars("theta"))
                    stats_all.append(stats)
    finally:
        bar.close()
    result = _assemble(spec, pieces, problems_ds, stats_all, bregman_note, devices)
    result.attrs["theta_trajectories"] = (
        "in this dataset" if keep_theta else "in the chunk files only (too large to assemble); "
        "read them with ddln_jax.load_trajectories"
    )
    if store is not None and store.writer:
        store.write_final(result)
    return result


def load_trajectories(out, **selection) -> xr.DataArray:
    """θ(t) of the runs of a sweep directory matching `selection` (e.g. `depth=3,
    alpha=0.5`), read chunk by chunk: for sweeps too large to hold θ(t) in memory at once.

    **Returns:** a DataArray with the run dimensions of the selection, `time` and `coord`.
    """
    chunks = sorted((Path(out) / "chunks").glob("*.nc"))
    if not chunks:
        raise ValueError(f"{str(Path(out))!r} holds no sweep chunks")
    unknown = set(selection) - set(JOB_DIMS)
    if unknown:
        raise ValueError(f"selection keys must be among {JOB_DIMS}, got {sorted(unknown)}")
    parts = []
    for path in chunks:
        ds = load_dataset(path)
        mask = np.ones(ds.sizes["run"], bool)
        for key, value in selection.items():
            mask &= np.isin(ds[key].values, np.atleast_1d(value))
        if mask.any():
            parts.append(ds[["theta", *JOB_DIMS]].isel(run=np.flatnonzero(mask)))
    if not parts:
        raise ValueError(f"no run of {str(Path(out))!r} matches {selection}")
    flat = xr.concat(parts, dim="run").set_index(run=list(JOB_DIMS)).unstack("run")
    return flat["theta"].transpose(*[d for d in (*JOB_DIMS, "time", "coord") if d in flat["theta"].dims])


def _assemble(spec, pieces, problems_ds, stats_all, bregman_note, devices) -> xr.Dataset:
    flat = xr.concat(pieces, dim="run", combine_attrs="drop")
    flat = flat.set_index(run=list(JOB_DIMS)).unstack("run")
    flat = flat.reindex(
        depth=list(spec.run.depths), problem=list(spec.problem.seeds), shape=list(spec.init.shape),
        alpha=list(spec.init.alpha),
        seed=list(spec.init.seeds if spec.init.scheme == "gaussian" else spec.init.seeds[:1]),
    )
    order = [*JOB_DIMS, "time", "coord"]
    flat = flat.transpose(*[dim for dim in order if dim in flat.dims])
    ds = xr.merge([flat, problems_ds])
    executed = sum(s["lane_steps_executed"] for s in stats_all)
    useful = sum(s["lane_steps_useful"] for s in stats_all)
    status = ds["status"].values
    ds.attrs = {
        "spec": json.dumps(spec.to_dict(), sort_keys=True),
        "spec_digest": spec.digest(),
        "versions": json.dumps(_versions(), sort_keys=True),
        "stop_ratio": float(spec.run.stop_ratio) if spec.run.stop_ratio is not None else math.nan,
        "bregman": bregman_note,
        "lane_efficiency": useful / executed if executed else math.nan,
        "devices": len(devices),
        "n_runs": int(status.size),
        "n_failed": int(np.sum((status != Status.SUCCESS) & (status != Status.EVENT))),
    }
    return ds


def _progress(total, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="run", desc="sweep", dynamic_ncols=True)


def summary(ds: xr.Dataset) -> str:
    """A text table: per depth and α, the runs, failures, and median time-to-ε / final loss."""
    lines = []
    has_eps = np.isfinite(ds.attrs.get("stop_ratio", math.nan))
    head = f"{'depth':>5} {'alpha':>9} {'runs':>5} {'failed':>6} "
    head += f"{'reached eps':>11} {'median time-to-eps':>19}" if has_eps else f"{'median final loss':>18}"
    lines.append(head)
    for L in ds.depth.values:
        for a in ds.alpha.values:
            sub = ds.sel(depth=L, alpha=a)
            st = sub["status"].values.ravel()
            failed = int(np.sum((st != Status.SUCCESS) & (st != Status.EVENT)))
            if has_eps:
                # Runs that ended at t1 above ε count as +inf in the median.
                vals = np.where(st == Status.SUCCESS, np.inf, sub["time_to_eps"].values.ravel())
                val = np.nanmedian(vals) if np.any(~np.isnan(vals)) else math.nan
                reached = int(np.sum(st == Status.EVENT))
                cell = f"{reached:>11} {val:>19.4g}"
            else:
                cell = f"{np.nanmedian(sub['loss_final'].values):>18.3e}"
            lines.append(f"{int(L):>5} {a:>9.4g} {st.size:>5} {failed:>6} {cell}")
    n_failed = ds.attrs.get("n_failed", 0)
    lines.append(
        f"{ds.attrs.get('n_runs', 0)} runs, {n_failed} failed; lane efficiency "
        f"{ds.attrs.get('lane_efficiency', math.nan):.2f}"
    )
    return "\n".join(lines)
