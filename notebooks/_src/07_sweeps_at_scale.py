# %% [markdown]
# # 07 · Sweeps at scale: a spec, a labelled dataset, resume, your own loss and inits
#
# `dj.sweep` runs inits × depths × problems on the lane engine: every lane steps its own run and
# takes the next one from a queue when its run ends (runs are dealt hardest first), so a batch of
# runs needing very different numbers of steps keeps the hardware busy. A spec (a TOML file, a
# dict or `dj.SweepSpec`) says what to run; the result is an `xarray.Dataset` labelled by
# `depth, problem, shape, alpha, seed` (or `init`), `time`, `coord`. With an output directory,
# every finished chunk is written at once and a rerun of the same spec resumes.
#
# **Claims.**
# 1. Every run of the sweep ends at its loss threshold (status `event`), and the engine keeps
#    its lanes busy (lane efficiency ≥ 0.5, reported in `ds.attrs`).
# 2. Depth slows small inits and speeds up large ones: at the smallest α (< 1) the time to ε
#    grows with depth, at the largest (> 1) it shrinks (docs/math.md, "Convergence bounds":
#    $c_0 \propto \alpha^{2(L-1)}$).
# 3. A sweep split into shards and finished by a plain rerun, then rerun again, is loaded from
#    disk without recomputing, and is the same dataset (`xarray.Dataset.identical`).
# 4. A loss and inits given in memory (`kind = "custom"`, `scheme = "custom"`) run the same way.
#
# `FULL = True` runs the shipped default spec with a wider α grid and more seeds (meant for an
# accelerator); the reduced size below takes seconds on a 2-core CPU.

# %%
import jax

jax.config.update("jax_enable_x64", True)  # the library never flips this for you
import json
import tempfile
import time
import warnings
from pathlib import Path

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dj

with warnings.catch_warnings():  # tqdm's notice about Jupyter widgets, not about the sweep
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

FULL = False  # True: the full size (meant for an accelerator)
T0, C0 = time.perf_counter(), time.process_time()


if FULL:  # the shipped default spec (`dj.SweepSpec.default()`), wider and with more seeds
    raw = {
        "problem": {"kind": "sparse_regression", "n": 20, "d": 60, "sparsity": 3, "seeds": [0]},
        "init": {"scheme": "gaussian", "alpha": {"geomspace": [0.35, 2.0, 8]},
                 "seeds": list(range(16))},
        "run": {"depths": [2, 3, 4, 5], "t1": 3000.0, "n_save": 101, "save_spacing": "log",
                "stop_ratio": 1e-6, "rtol": 1e-8, "atol": 1e-10},
        "engine": {"lanes": 64, "chunk_size": 512},
    }
else:
    raw = {
        "problem": {"kind": "sparse_regression", "n": 8, "d": 16, "sparsity": 2, "seeds": [0]},
        "init": {"scheme": "gaussian", "alpha": {"geomspace": [0.5, 2.0, 3]}, "seeds": [0, 1]},
        "run": {"depths": [2, 3], "t1": 300.0, "n_save": 41, "save_spacing": "log",
                "stop_ratio": 1e-4, "rtol": 1e-10, "atol": 1e-12},
        "engine": {"lanes": 4, "chunk_size": 12},
    }
spec = dj.SweepSpec.from_dict(raw)  # validated now: a typo fails here, naming section and key
print(json.dumps({k: v for k, v in spec.to_dict()["init"].items()}, default=float))

# %% [markdown]
# ## Run it: in shards, then resumed
# The sweep goes into a temporary directory. First only shard 0 of 2 runs (as one job of a
# Slurm array would): it writes its chunks and returns `None`, since the sweep is not complete.
# A plain rerun then computes only the missing chunks and assembles `results.nc`.

# %%
workdir = tempfile.TemporaryDirectory()
out = Path(workdir.name) / "sweep"
start = time.perf_counter()
part = dj.sweep(spec, out, shard=(0, 2), progress=False)
t_shard = time.perf_counter() - start
assert part is None  # shard 0 alone does not complete the sweep
n_chunks = len(list((out / "chunks").glob("*")))
start = time.perf_counter()
ds = dj.sweep(spec, out, progress=False)
t_rest = time.perf_counter() - start
print(f"shard 0/2: {t_shard:.1f} s ({n_chunks} chunk files); the rest: {t_rest:.1f} s")
ds  # noqa: B018 (the cell shows the dataset)

# %% [markdown]
# ## The dataset
# Run variables carry the run dimensions; `loss`, `theta` (and `bregman`, D_Q(θ_min, θ(t)),
# when the loss has a known minimizer) add `time`; the problem's data (`X`, `y`, `theta_star`,
# `f_star`, `pl_mu`) is labelled by `problem`. `dj.summary` prints one line per (depth, α).

# %%
run_dims = ("depth", "problem", "shape", "alpha", "seed")
assert ds["status"].dims == run_dims
assert ds["loss"].dims == (*run_dims, "time") and ds["theta"].dims == (*run_dims, "time", "coord")
assert ds.sizes["time"] == len(spec.save_times) and ds.sizes["coord"] == spec.problem.d
print(dj.summary(ds))
status = ds["status"].values
n_runs = status.size
assert n_runs == ds.attrs["n_runs"] and ds.attrs["n_failed"] == 0

# %% [markdown]
# Claim 1, checked on the values: every run reached f − f* ≤ ε (f(θ0) − f*) at `time_to_eps`
# (within the solver's tolerance), and the lane efficiency is the share of busy lane-steps.

# %%
# Stored codes are the positions of `dj.Status`'s items (its docstring).
names = np.array(["success", "max_steps", "nonfinite", "event", "failed", "inaccurate"])
status_name = names[status]
assert np.all(status_name == "event"), np.unique(status_name, return_counts=True)
excess = (ds["loss_final"] - ds["f_star"]) / (ds["f0"] - ds["f_star"])
eps = ds.attrs["stop_ratio"]
assert float(excess.max()) <= eps * (1 + 1e-6), float(excess.max())
assert np.all(np.isfinite(ds["time_to_eps"].values))
eff = ds.attrs["lane_efficiency"]
print(f"{n_runs} runs, relative excess at the stop ≤ {float(excess.max()):.3e} (ε = {eps:g}); "
      f"lane efficiency {eff:.2f}")
assert 0.5 <= eff <= 1.0, eff

# %% [markdown]
# ## Figures: loss curves by depth and α, and the time to ε
# Left: the relative excess (f − f*)/(f(θ0) − f*) of every run (saves after the stop are NaN).
# Right: the median time to ε over the init seeds, per depth, against α.

# %%
rel = (ds["loss"] - ds["f_star"]) / (ds["f0"] - ds["f_star"])
alphas, depths = ds.alpha.values, ds.depth.values
colors = plt.cm.viridis(np.linspace(0, 0.9, len(alphas)))
styles = ["-", "--", ":", "-."]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for i, L in enumerate(depths):
    for k, a in enumerate(alphas):
        curves = rel.sel(depth=L, alpha=a).isel(problem=0, shape=0).values  # (seed, time)
        for s, c in enumerate(curves):
            ax1.loglog(ds.time.values[1:], c[1:], styles[i % 4], color=colors[k], lw=1,
                       label=f"L={L}, α={a:.2g}" if s == 0 else None)
ax1.axhline(eps, color="k", lw=0.8)
ax1.set(xlabel="t", ylabel="(f − f*)/(f(θ0) − f*)", title="loss curves (— L=2, -- L=3)")
ax1.legend(fontsize=7, ncol=2)
t_eps = ds["time_to_eps"].median(dim=("problem", "shape", "seed"))  # (depth, alpha)
for i, L in enumerate(depths):
    ax2.loglog(alphas, t_eps.sel(depth=L).values, "o" + styles[i % 4], label=f"L={L}")
ax2.set(xlabel="α", ylabel="median time to ε", title="time to ε")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Claim 2: at the smallest α the time to ε increases with depth, at the largest it decreases
# (medians over the init seeds; checked for every pair of consecutive depths).

# %%
small, large = t_eps.isel(alpha=0).values, t_eps.isel(alpha=-1).values
assert alphas[0] < 1 < alphas[-1]
print(f"α = {alphas[0]:.2g}: {np.array2string(small, precision=3)};  "
      f"α = {alphas[-1]:.2g}: {np.array2string(large, precision=3)}  (depths {depths.tolist()})")
assert np.all(np.diff(small) > 0), small
assert np.all(np.diff(large) < 0), large

# %% [markdown]
# ## Resume: the finished sweep is loaded, not recomputed
# The same spec into the same directory returns the stored dataset: no run is computed (it
# takes a fraction of the first run's time, and the chunk files are untouched), and the dataset
# is identical, values, coordinates and attributes. A different spec would be refused.

# %%
stamps = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("*")}
start = time.perf_counter()
again = dj.sweep(spec, out, progress=False)
t_again = time.perf_counter() - start
print(f"rerun: {t_again:.2f} s (first: {t_shard + t_rest:.1f} s)")
assert again.identical(ds)
assert {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("*")} == stamps
assert t_again < 0.25 * (t_shard + t_rest), (t_again, t_shard + t_rest)
other = dj.SweepSpec.from_dict({**raw, "run": {**raw["run"], "t1": 1.01 * raw["run"]["t1"]}})
try:
    dj.sweep(other, out, progress=False)
    raise AssertionError("a different spec was accepted into the directory")
except (dj.SpecError, OSError) as e:  # StoreError is an OSError
    print("another spec is refused:", str(e)[:120], "…")

# %% [markdown]
# ## Your own loss and inits, in memory
# Any jittable f(θ) works as the loss (`kind = "custom"`), any array (B, L, d) as the inits
# (`scheme = "custom"`); runs are then labelled `init = 0…B−1`. Here: a robust regression loss
# f(θ) = mean log cosh(Xθ − y) on the sweep's own data, whose minimum is 0 at the interpolators,
# from depth-3 inits of four scales with a per-coordinate shape. Claim 4: every run reaches ε
# and ends (almost) interpolating.

# %%
X, y = jnp.asarray(ds["X"].values[0]), jnp.asarray(ds["y"].values[0])
d = X.shape[1]


def logcosh(theta, X, y):
    r = X @ theta - y
    return jnp.mean(jnp.logaddexp(r, -r) - jnp.log(2.0))


# A `Partial` keeps X and y as leaves: they enter the spec digest with the loss's bytecode.
loss = dj.CallableLoss(jax.tree_util.Partial(logcosh, X=X, y=y), d)
shape = 1.0 + 0.5 * np.cos(np.arange(d))  # a per-coordinate profile
U = np.stack([a * np.stack([0.5 * shape, shape, shape]) for a in (0.3, 0.6, 1.2, 2.4)])
custom = {"problem": {"kind": "custom"}, "init": {"scheme": "custom"},
          "run": {"depths": [3], "t1": 2000.0, "n_save": 21, "save_spacing": "log",
                  "stop_ratio": 1e-6, "rtol": 1e-10, "atol": 1e-12},
          "engine": {"lanes": 4}}
dc = dj.sweep(custom, loss=loss, inits=U, progress=False)
print(dj.summary(dc))
assert dc["status"].dims == ("depth", "problem", "init")
assert np.all(names[dc["status"].values] == "event")
res = np.einsum("nd,...d->...n", ds["X"].values[0], dc["theta_final"].values)
res_rel = np.linalg.norm(res - ds["y"].values[0], axis=-1) / np.linalg.norm(ds["y"].values[0])
print("‖Xθ_final − y‖/‖y‖ per init:", np.array2string(res_rel.ravel(), precision=2))
assert np.all(res_rel <= 1e-2), res_rel
workdir.cleanup()
print(f"notebook time: {time.perf_counter() - T0:.1f} s wall, "
      f"{time.process_time() - C0:.1f} s CPU (all threads of this kernel)")
