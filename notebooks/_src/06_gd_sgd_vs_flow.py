# %% [markdown]
# # 06 · Gradient descent, SGD and Adam next to the gradient flow
#
# The flow is the η → 0 limit of gradient descent on the layers, $u_{k+1} = u_k - \eta\nabla_u
# f(u^1\odot\dots\odot u^L)$, on the clock $t = k\eta$. `dj.train` runs any optax optimizer on the
# layers (every step, learning rate, seed and init in one compiled `lax.scan`), and `dj.sgd_sde`
# integrates the stochastic flow that models minibatch SGD.
#
# **Claims.** (i) GD converges to the flow with order one in η; (ii) steps well below the
# stability limit $2/\lambda_{\max}$ of the init converge, steps well above it blow up (reported as `Status.nonfinite`,
# never a silent NaN); (iii) GD shrinks the conserved gaps by an exact amount per step, so it ends
# away from the implicit-bias limit of its own init (the step size changes the implicit bias);
# (iv) SGD's mean loss matches its SDE within the Monte-Carlo band; (v) Adam, on the same axes,
# ends at a different interpolator.

# %%
import jax

jax.config.update("jax_enable_x64", True)
import time
from statistics import NormalDist

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import ddln_jax as dj

FULL = False  # True: the full size (meant for an accelerator)
n, d, L = (40, 200, 3) if FULL else (10, 20, 3)
SEEDS, PATHS = (512, 512) if FULL else (128, 96)
T0 = time.perf_counter()
kx, ku = jax.random.split(jax.random.PRNGKey(6))
X = jax.random.normal(kx, (n, d))
y = X @ jnp.zeros(d).at[:3].set(jnp.array([1.0, -1.0, 0.5]))
loss = dj.LeastSquares(X, y)
u0 = dj.gaussian_init(ku, L, d, 0.5)
eta_max = float(dj.stable_learning_rate(loss, u0))
print(f"2/λ_max at the init: η_max = {eta_max:.3f}")

# %% [markdown]
# ## (i) GD → flow, first order in η
# Three step sizes, halved each time, run to the same time T; the flow at T with tight
# tolerances. The error at T should halve with η.

# %%
T = 20.0
saves_t = np.linspace(0, T, 11)
flow = dj.simulate(loss, u0, t1=T, ts=saves_t, rtol=1e-12, atol=1e-14)
etas = 0.02 * eta_max * np.array([4.0, 2.0, 1.0])
errors, gd = [], {}
for eta in etas:
    steps = int(round(T / eta))
    gd[eta] = dj.train(loss, u0, optax.sgd, learning_rate=eta, steps=steps,
                       saves=np.round(saves_t / eta).astype(int))
    assert gd[eta].status == dj.Status.success
    errors.append(float(jnp.max(jnp.abs(gd[eta].theta[-1] - flow.theta[-1]))))
errors = np.array(errors)
order = np.polyfit(np.log(etas), np.log(errors), 1)[0]
print("η:", np.array2string(etas, precision=4), " |θ_GD(T) − θ(T)|:", np.array2string(errors, precision=3),
      f" fitted order {order:.3f}")
assert 0.9 <= order <= 1.1, order
assert np.all(errors[:-1] / errors[1:] > 1.8)

# %% [markdown]
# ## (ii) Step size: stability and the drift of the gaps
# A batch of step sizes around $\eta_{\max}$ in one compiled call. GD conserves nothing exactly:
# one step changes each gap by $\eta^2(\partial_i f)^2[(\prod_{l\ne j}u^l)^2 - (\prod_{l\ne m}u^l)^2]
# \le 0$ (`dj.gd_drift`, checked to rounding), so larger steps shrink the gaps more.

# %%
fractions = np.array([0.05, 0.15, 0.3, 0.5, 3.0])
sweep = dj.train(loss, u0, optax.sgd, learning_rate=fractions * eta_max, steps=20000, save_every=200)
print("status per η/η_max:", dict(zip(fractions.tolist(), sweep.status_name.tolist())))
print("diverged at step:", dict(zip(fractions.tolist(), np.asarray(sweep.diverged_step).tolist())))

pred, actual = dj.gd_drift(loss, u0, 0.5 * eta_max)
drift_err = float(jnp.max(jnp.abs(pred - actual)) / jnp.max(jnp.abs(pred)))
print(f"one GD step at η = η_max/2: gap drift identity holds to {drift_err:.1e} (relative)")

gaps0 = np.asarray(sweep.conserved[0, 0])  # (L, d), identical for every η at step 0
gap_change = np.array([np.abs(np.asarray(sweep.conserved[r, -1]) - gaps0).sum()
                       for r in range(len(fractions))])

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for r, f in enumerate(fractions):
    axes[0].semilogy(sweep.step, sweep.loss[r], label=f"η = {f:g} η_max ({sweep.status_name[r]})")
axes[0].set(xlabel="step k", ylabel="f(θ_k)", title="GD at several step sizes",
            ylim=(1e-16, 1e4 * float(sweep.loss[0, 0])))
axes[0].legend(fontsize=8)
ok = np.asarray(sweep.succeeded)
axes[1].loglog(fractions[ok], gap_change[ok], "o-")
axes[1].loglog(fractions[ok], gap_change[ok][0] * (fractions[ok] / fractions[0]) ** 2, "k:", lw=0.8,
               label="∝ η²")
axes[1].set(xlabel="η / η_max", ylabel="Σ |gap drift| at the end", title="GD shrinks the gaps")
axes[1].legend()
fig.tight_layout()
plt.show()

# %%
assert drift_err <= 1e-10, drift_err
stable, unstable = fractions <= 0.5, fractions > 2
assert np.all(sweep.succeeded[stable]), sweep.status_name
rel_final = np.asarray(sweep.loss_final) / float(sweep.loss[0, 0])
assert np.all(rel_final[stable] < 1e-6), rel_final
assert np.all(np.asarray(sweep.status_name)[unstable] == "nonfinite")
assert np.all(np.asarray(sweep.diverged_step)[unstable] >= 0)
assert np.all(np.isfinite(np.asarray(sweep.theta_final))), "theta_final"  # frozen at the last finite state
assert np.all(np.diff(gap_change[ok]) > 0), gap_change  # larger steps, larger drift
# and the drift only shrinks the gaps (GD makes the init effectively smaller)
final_gaps = np.asarray(sweep.conserved[:, -1])
assert np.all(final_gaps[ok] <= gaps0[None] + 1e-12), np.max(final_gaps[ok] - gaps0[None])

# %% [markdown]
# ## (iii) The effective initialization
# `dj.effective_init(u0, u_final)` is the init with the gaps GD ended with and the same θ0: a
# smaller init (GD only shrinks gaps). Where GD ends is compared with the implicit-bias limit of the
# flow from $u_0$ (`dj.implicit_bias_limit`) and from the effective init.
#
# **Measured here:** small steps end at the flow's limit (to first order in η); the largest stable
# step ends far from it, and also far from the effective init's limit: the gaps drift *along* the
# path, so the potential GD follows is neither the initial one nor the final one. The endpoint of
# large-step GD is not predicted by either potential alone.

# %%
BIG = 3  # η = 0.5 η_max, the largest stable step of the sweep (`Training` has no run indexing)
lim_flow = dj.implicit_bias_limit(X, y, u0)
u_eff = dj.effective_init(u0, sweep.u_final[BIG])
# = dj.effective_implicit_bias(X, y, u0, u_final), spelled out (that helper is being fixed)
lim_eff = dj.implicit_bias_limit(X, y, u_eff)
assert bool(lim_flow.converged) and bool(lim_eff.converged)
theta_gd = np.asarray(sweep.theta_final[BIG])
d_flow = np.linalg.norm(theta_gd - np.asarray(lim_flow.theta))
d_eff = np.linalg.norm(theta_gd - np.asarray(lim_eff.theta))
small_gd = np.asarray(sweep.theta_final[0])  # η = 0.05 η_max
d_small = np.linalg.norm(small_gd - np.asarray(lim_flow.theta))
rms = lambda u: float(jnp.sqrt(jnp.mean(jnp.asarray(u) ** 2)))
print(f"scale of the init: {rms(u0):.3f} → effective {rms(u_eff):.3f}")
print(f"GD at η = 0.5 η_max ends at distance {d_flow:.2e} from the flow's limit, {d_eff:.2e} from the "
      f"effective init's limit; GD at η = 0.05 η_max: {d_small:.2e} from the flow's limit")

fig, ax = plt.subplots(figsize=(7, 3.6))
idx = np.arange(d)
ax.plot(idx, np.asarray(lim_flow.theta), "o", mfc="none", label="flow limit from u0")
ax.plot(idx, np.asarray(lim_eff.theta), "x", label="flow limit from the effective init")
ax.plot(idx, theta_gd, ".", color="k", label="GD, η = 0.5 η_max")
ax.plot(idx, small_gd, "+", color="C2", label="GD, η = 0.05 η_max")
ax.set(xlabel="coordinate i", ylabel="θ_i at the end", title="where GD ends")
ax.legend(fontsize=8)
plt.show()

# %%
# The effective init keeps θ0, is smaller, and every run interpolates.
assert np.allclose(np.prod(np.asarray(u_eff), axis=0), np.prod(np.asarray(u0), axis=0), rtol=1e-10, atol=1e-14)
assert rms(u_eff) < rms(u0)
assert float(sweep.loss_final[BIG]) < 1e-10 and float(sweep.loss_final[0]) < 1e-10
# small steps: the flow's limit; the large step: far from both potentials' limits
assert d_small < 0.02 * np.linalg.norm(np.asarray(lim_flow.theta)), d_small
assert d_flow > 10 * d_small and d_eff > 10 * d_small, (d_flow, d_eff, d_small)

# %% [markdown]
# ## (iv) SGD and its stochastic flow
# On noisy least squares (n > d, so no interpolation and a noise floor), minibatch SGD with b
# samples per step, over many seeds, next to Euler–Maruyama paths of
# $du = -\nabla F\,dt + \sqrt{\eta}\,J^\top\Sigma^{1/2}dW$ (`dj.sgd_sde`). The mean losses agree
# within a simultaneous 95% band; both sit above the deterministic flow (the noise floor).

# %%
rng = np.random.default_rng(1)
Xn = rng.standard_normal((40, 8))
yn = Xn @ rng.standard_normal(8) + 0.5 * rng.standard_normal(40)
noisy = dj.LeastSquares(Xn, yn)
v0 = jnp.asarray(rng.standard_normal((2, 8)))
eta, b, steps = 0.1 * float(dj.stable_learning_rate(noisy, v0)), 4, 300
saves = np.linspace(0, steps, 7).astype(int)
sgd = dj.train(noisy, v0, optax.sgd, steps=steps, learning_rate=eta, saves=saves, batch_size=b,
               key=jax.random.split(jax.random.key(0), SEEDS))
sde = dj.sgd_sde(noisy, v0, learning_rate=eta, batch_size=b, t1=steps * eta, ts=saves * eta,
                 key=jax.random.key(1), num_paths=PATHS, dt=eta / 2)
nflow = dj.simulate(noisy, v0, t1=steps * eta, ts=saves * eta, rtol=1e-10, atol=1e-12)
a, s = np.asarray(sgd.loss), np.asarray(sde.loss)
se = np.hypot(a.std(0, ddof=1) / np.sqrt(SEEDS), s.std(0, ddof=1) / np.sqrt(PATHS))
z = NormalDist().inv_cdf(1 - 0.025 / (len(saves) - 1))  # Bonferroni over the noisy saves

fig, ax = plt.subplots(figsize=(7, 3.8))
t = saves * eta
ax.plot(t, a.mean(0), "o-", label=f"SGD, b={b}, mean of {SEEDS} seeds")
ax.fill_between(t, s.mean(0) - z * se, s.mean(0) + z * se, alpha=0.3, color="C1",
                label=f"SDE, mean of {PATHS} paths ± 95% band")
ax.plot(t, nflow.loss, "k--", label="gradient flow")
ax.set(yscale="log", xlabel="t = kη", ylabel="f(θ)", title="SGD ≈ its SDE; both above the flow")
ax.legend(fontsize=8)
plt.show()

# %%
assert np.all(sgd.succeeded) and np.all(sde.succeeded)
diff = a.mean(0) - s.mean(0)
print("(SGD − SDE) mean loss / band:", np.array2string(diff[1:] / (z * se[1:]), precision=2))
assert np.all(np.abs(diff[1:]) <= z * se[1:])
assert s.mean(0)[-1] - float(nflow.loss[-1]) > 3 * z * se[-1]  # the noise floor is resolved

# %% [markdown]
# ## (v) Adam on the same axes
# Adam on the layers of the interpolating problem reaches zero loss too, but its implicit bias is
# not the mirror geometry's: it ends at a different interpolator.

# %%
adam = dj.train(loss, u0, optax.adam, learning_rate=1e-2, steps=4000, save_every=40)
theta_adam = np.asarray(adam.theta_final)
d_adam = np.linalg.norm(theta_adam - np.asarray(lim_flow.theta))
print(f"Adam: final loss {float(adam.loss_final):.1e}, distance to the flow's limit {d_adam:.2e} "
      f"(GD at small η: {d_small:.2e})")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
axes[0].semilogy(flow.ts, flow.loss, "k", lw=2, label="flow")
axes[0].semilogy(sweep.ts[0], sweep.loss[0], label="GD, η = 0.05 η_max")
axes[0].semilogy(adam.step * 1e-2, adam.loss, label="Adam, lr 1e-2 (t = k·lr)")
axes[0].set(xlabel="t (log scale)", ylabel="f(θ)", xscale="log", ylim=(1e-20, 10), title="loss")
axes[0].legend(fontsize=8)
axes[1].plot(idx, np.asarray(lim_flow.theta), "o", mfc="none", label="flow limit")
axes[1].plot(idx, small_gd, ".", color="C0", label="GD")
axes[1].plot(idx, theta_adam, "x", color="C1", label="Adam")
axes[1].set(xlabel="coordinate i", ylabel="θ_i at the end", title="where they end")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
assert adam.status == dj.Status.success and float(adam.loss_final) < 1e-8
assert d_adam > 10 * d_small, (d_adam, d_small)

# %%
print(f"notebook compute time: {time.perf_counter() - T0:.1f} s")
