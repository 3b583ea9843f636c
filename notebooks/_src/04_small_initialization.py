# %% [markdown]
# # 04 · Small initializations: escape from the saddle, saddle to saddle, and stiffness
#
# Started at scale α → 0, a deep diagonal network sits near the saddle θ = 0 for a long time
# before anything happens. In the mirror picture (docs/math.md, "Small initializations and
# escape times") the dual variable $\eta = \nabla Q(\theta)$ moves at the frozen speed
# $|\partial_i f(\theta_0)|$ and coordinate $i$ escapes when $\eta_i$ reaches the face of the box
# $|\eta_i| < \Phi_i(\infty)$ (depth $L \ge 3$), or when $\theta_i \approx (\delta_i/4)e^{2\eta_i}$
# becomes of order one ($L = 2$). For the zero-first init ($u^1 = 0$, $u^j = \alpha$),
# $\Phi(\infty) = c_L\,\alpha^{-(L-2)}$, so
#
# $$T_{\rm escape} \approx \frac{c_L\,\alpha^{-(L-2)}}{\|\nabla f(0)\|_\infty}\ (L \ge 3),
# \qquad T_{\rm escape} \approx \frac{\log(1/\alpha)}{\|\nabla f(0)\|_\infty}\ (L = 2).$$
#
# **Claims.**
# 1. The predicted escape time (`dj.predict_escape_time`) matches the simulated one
#    (`dj.measure_escape_time`) to ≤ 5% at small α; on a log–log plot the slope is −(L − 2) for
#    L ≥ 3, and for L = 2 the time grows like log(1/α) with slope 1/‖∇f(0)‖∞.
# 2. At L = 2, on the clock t̃ = t/log(1/α), the loss is piecewise constant (saddle to saddle),
#    with its first jump at t̃ = 1/‖∇f(0)‖∞ (`dj.predict_first_jump`, `dj.detect_saddles`).
# 3. The long plateau makes the flow stiff; the default solver notices and switches to a
#    Rosenbrock method by itself, and its accuracy does not depend on α.

# %%
import jax

jax.config.update("jax_enable_x64", True)  # the library never flips this for you
import math
import time

import diffrax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dj

FULL = False  # True: the full size (meant for an accelerator)
n, d = (40, 200) if FULL else (4, 8)
NS = 401  # save times per run: one compiled program per depth, reused by every run below
T0 = time.perf_counter()
rng = np.random.default_rng(0)
X = rng.normal(size=(n, d))
theta_planted = np.zeros(d)
theta_planted[[1, 5]] = [1.0, -0.7]
y = X @ theta_planted
loss = dj.LeastSquares(X, y)
gmax = float(jnp.max(jnp.abs(loss.grad(jnp.zeros(d)))))
print(f"‖∇f(0)‖∞ = {gmax:.4f}")

# %% [markdown]
# ## The box and its constant
# `dj.phi_inf` gives the half-widths Φ(∞) of the dual box from the layers; for the zero-first init
# they equal `dj.phi_inf_constant(L)`·α^{−(L−2)} (c₃ = π/2, c₄ = 1).

# %%
for L, c in ((3, math.pi / 2), (4, 1.0)):
    assert abs(dj.phi_inf_constant(L) / c - 1) <= 1e-14
    for a in (1e-2, 1e-6):
        box = np.asarray(dj.phi_inf(dj.zero_first_init(L, d, a)))
        assert np.allclose(box, dj.phi_inf_constant(L) * a ** (2 - L), rtol=1e-10), (L, a)
print("Φ(∞) = c_L α^-(L-2) checked for L = 3, 4 at α = 1e-2, 1e-6")

# %% [markdown]
# ## Escape times against α, per depth
# One run per (L, α), saved densely around the predicted escape; the run counts as escaped when
# max_i |θ_i − θ_i(0)| reaches 0.1 (a tenth of the solution's scale).

# %%
# Each depth compiles its own program (~8 s of CPU): the reduced size skips L = 3 (notebook 05
# shows its α^L rate); L = 4 is the depth of the stiffness section below.
DEPTHS = (2, 3, 4, 5) if FULL else (2, 4)
ALPHAS = {L: np.geomspace(1e-2, 1e-16, 8 if FULL else 5) if L == 2
          else np.geomspace(1e-1, 1e-4, 7 if FULL else 4) for L in DEPTHS}
escape = {}
for L, alphas in ALPHAS.items():
    rows = []
    for a in alphas:
        u0 = dj.zero_first_init(L, d, a)
        pred = float(dj.predict_escape_time(loss, u0).first)
        ts = np.concatenate([[0.0], np.linspace(0.5 * pred, 1.5 * pred, NS - 1)])
        tr = dj.simulate(loss, u0, t1=ts[-1], ts=ts)
        assert tr.status_name == "success", (L, a, tr.status_name)
        rows.append((pred, float(dj.measure_escape_time(tr, 0.1))))
    escape[L] = np.array(rows)
    rel = escape[L][:, 1] / escape[L][:, 0] - 1
    print(f"L = {L}: α = {np.array2string(alphas, formatter={'float': lambda v: f'{v:.0e}'})}\n"
          f"       relative error measured/predicted − 1 = {np.array2string(rel, precision=4)}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
ax = axes[0]
for L in DEPTHS[1:]:
    a, (p, m) = ALPHAS[L], escape[L].T
    ax.loglog(a, m, "o", color=f"C{L}", label=f"L = {L}, simulated")
    ax.loglog(a, p, "-", color=f"C{L}", label=f"predicted, slope −{L - 2}")
ax.set(xlabel="α", ylabel="escape time", title="L ≥ 3: a power law in α")
ax.legend(fontsize=8)
ax = axes[1]
a, (p, m) = ALPHAS[2], escape[2].T
ax.semilogx(a, m, "o", color="C2", label="L = 2, simulated")
ax.semilogx(a, p, "-", color="C2", label="log(1/α)/‖∇f(0)‖∞")
ax.set(xlabel="α", ylabel="escape time", title="L = 2: logarithmic in 1/α")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# **Checks.** The relative error is ≤ 5% at small α (α ≤ 1e-2 for L ≥ 3, where it is
# O(α^{L−2}); α ≤ 1e-4 for L = 2, where it is O(1/log(1/α))). The log–log slope of the simulated
# times over the two smallest α is −(L − 2) to ±0.02, and for L = 2 the slope of T against
# log(1/α) is 1/‖∇f(0)‖∞ to 2%.

# %%
for L, alphas in ALPHAS.items():
    p, m = escape[L].T
    small = alphas <= (1e-2 if L >= 3 else 1e-4) * (1 + 1e-9)
    assert np.all(np.abs(m[small] / p[small] - 1) <= 0.05), (L, m / p - 1)
    if L >= 3:
        slope = np.diff(np.log(m[-2:])) / np.diff(np.log(alphas[-2:]))
        assert abs(slope[0] + (L - 2)) <= 0.02, (L, slope)
        print(f"L = {L}: log–log slope {slope[0]:+.4f} (predicted −{L - 2})")
    else:
        slope = np.diff(m[-2:]) / np.diff(np.log(1 / alphas[-2:]))
        assert abs(slope[0] * gmax - 1) <= 0.02, slope
        print(f"L = 2: dT/dlog(1/α) = {slope[0]:.4f} (predicted 1/‖∇f(0)‖∞ = {1 / gmax:.4f})")

# %% [markdown]
# ## Saddle to saddle at depth 2
# On the clock t̃ = t/log(1/α) (`dj.rescaled_time`) the loss of a small-α depth-2 run is a
# staircase: plateaus near saddles, sharp jumps between them, the first at
# t̃₁ = 1/‖∇f(0)‖∞ (`dj.predict_first_jump`). As α → 0 the jumps sharpen and the measured first
# jump (`dj.detect_saddles`) tends to the prediction.

# %%
t_jump = float(dj.predict_first_jump(loss))
assert abs(t_jump * gmax - 1) <= 1e-12
tt = np.linspace(0.0, 4.0, NS)  # rescaled times: 100 saves per unit
fig, ax = plt.subplots(figsize=(7, 3.6))
jumps = {}
for k, a in enumerate((1e-4, 1e-16)):
    tr = dj.simulate(loss, dj.zero_first_init(2, d, a), t1=tt[-1] * math.log(1 / a),
                     ts=tt * math.log(1 / a))
    assert tr.status_name == "success"
    assert np.allclose(dj.rescaled_time(tr.ts, a), tt, rtol=1e-12)
    s = dj.detect_saddles(tr, a)
    jumps[a] = s
    ax.semilogy(s.rescaled_ts, np.asarray(tr.loss)[: len(s.rescaled_ts)], f"C{k}", label=f"α = {a:g}")
    if a == 1e-16:
        for lo, hi in s.plateaus:
            ax.axvspan(lo, hi, color="C1", alpha=0.1)
    print(f"α = {a:g}: {len(s.plateaus)} plateaus, jumps at t̃ = "
          f"{np.array2string(s.jump_times, precision=3)}; predicted first {t_jump:.3f}")
ax.axvline(t_jump, color="k", ls=":", label="1/‖∇f(0)‖∞")
ax.set(xlabel="t / log(1/α)", ylabel="f(θ(t))", title="L = 2, zero-first init (shaded: plateaus at α = 1e-16)")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# **Checks.** At α = 1e-16 the run shows at least two plateaus, and its first jump is within 5%
# of 1/‖∇f(0)‖∞; it is closer than at α = 1e-4 (the error is O(1/log(1/α))).

# %%
err = {a: abs(s.first_jump / t_jump - 1) for a, s in jumps.items()}
assert len(jumps[1e-16].plateaus) >= 2
assert err[1e-16] <= 0.05 and err[1e-16] < err[1e-4], err
print("first-jump relative error:", {f"{a:g}": f"{e:.2%}" for a, e in err.items()})

# %% [markdown]
# ## The stiff regime, handled without user intervention
# At depth 4 and α = 1e-3 the plateau lasts ~10⁶ time units while the escape itself takes O(1):
# an explicit method is held at its stability limit through the whole plateau. The default
# solver (`dj.simulate(..., solver=None)`, i.e. Tsit5 switching to Rodas5P when it detects
# stiffness) is compared with plain `diffrax.Tsit5()` on the same run, t ∈ [0, 1.5·T_escape],
# with the same step budget (65 536).

# %%
L, a = 4, 1e-3
u0 = dj.zero_first_init(L, d, a)
t_end = 1.5 * float(dj.predict_escape_time(loss, u0).first)
ts = np.linspace(0.0, t_end, NS)
runs = {}
for name, solver in (("default (Auto)", None), ("diffrax.Tsit5()", diffrax.Tsit5())):
    dj.simulate(loss, u0, t1=t_end, ts=ts, solver=solver)  # compile
    start = time.perf_counter()
    tr = dj.simulate(loss, u0, t1=t_end, ts=ts, solver=solver)
    jax.block_until_ready(tr.theta)
    runs[name] = (tr, time.perf_counter() - start)
    print(f"{name:16s} status {tr.status_name:9s} steps {int(tr.num_steps):6d}  "
          f"t reached {float(tr.t_final):.3g} of {t_end:.3g}  ({runs[name][1] * 1e3:.0f} ms)")

# %%
auto, tsit = runs["default (Auto)"][0], runs["diffrax.Tsit5()"][0]
assert auto.status_name in ("success", "event")
assert int(tsit.num_steps) >= 20 * int(auto.num_steps), (int(tsit.num_steps), int(auto.num_steps))
print(f"Tsit5 used {int(tsit.num_steps) / int(auto.num_steps):.0f}× the steps "
      f"({tsit.status_name}); the default reached t1.")

# %% [markdown]
# ## Accuracy that does not depend on α
# The solver works in variables scaled by each coordinate's natural scale, so the default
# tolerances mean the same thing at α = 1e-2 and α = 1e-16, where θ is of size α^L = 1e-64.
# Each run covers 98% of the plateau (beyond it, at α = 1e-16, the escape would happen at
# t ≈ 10³², where float64 cannot resolve its O(1) duration); the reference uses rtol = 1e-12,
# atol = 1e-14.

# %%
ts = np.linspace(0.0, 1.0, NS)
errors = []
for a in (1e-2, 1e-8, 1e-16):
    u0 = dj.zero_first_init(L, d, a)
    t_end = 0.98 * float(dj.predict_escape_time(loss, u0).first)
    run = dj.simulate(loss, u0, t1=t_end, ts=ts * t_end)
    ref = dj.simulate(loss, u0, t1=t_end, ts=ts * t_end, rtol=1e-12, atol=1e-14)
    assert run.status_name == ref.status_name == "success"
    th, th_ref = np.asarray(run.theta[1:]), np.asarray(ref.theta[1:])
    errors.append(np.max(np.abs(th - th_ref) / np.abs(th_ref)))
    print(f"α = {a:5.0e}: |θ| ≤ {np.max(np.abs(th_ref)):.2e}, max relative error {errors[-1]:.3e}, "
          f"steps {int(run.num_steps)}")

# %% [markdown]
# **Check.** The maximum relative error over all saves and coordinates is below 1e-4 and the
# same at every α (within a factor 2).

# %%
errors = np.array(errors)
assert np.all(errors <= 1e-4) and errors.max() <= 2 * errors.min(), errors
print(f"all checks passed in {time.perf_counter() - T0:.1f} s")
