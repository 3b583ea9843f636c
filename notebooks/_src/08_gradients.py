# %% [markdown]
# # 08 · Gradients of outcomes: through the solver, the lane engine and the implicit-bias limit
#
# Every outcome of a run is a differentiable function of the init, its scale α and the data:
# the loss at the end of a run, the time to reach a loss threshold ε, the end point of the flow.
# JAX and diffrax give these derivatives exactly (to the solver's tolerance), without finite
# differences over sweeps.
#
# **Claims** (each checked against central finite differences, ≤ 1e-6 relative):
# 1. `jax.grad` of `dj.simulate(...).loss_final` with respect to α (for u0 = α·v) and to the
#    data X (reverse mode through diffrax's checkpointed adjoint).
# 2. Forward mode `dj.simulate_jvp` gives d t_ε/dα, the derivative of the time to ε (an event
#    time, by the implicit function theorem at the located event); on the lane engine
#    (`lanes=`) it equals the vmapped forward mode run by run.
# 3. The implicit-bias limit θ∞ = argmin {D_Q(θ, θ0) : Xθ = y} (`dj.implicit_bias_limit`) is
#    differentiable with respect to X and the init (implicit differentiation of its optimality
#    conditions, not through Newton's iterations).
# 4. **Worked example**: gradient descent (optax) on a per-coordinate init shape, through the
#    limit, learns an init whose flow recovers a sparse θ* from fewer samples than the
#    minimum-ℓ1 interpolator needs, checked by simulating the learned init to convergence.

# %%
import jax

jax.config.update("jax_enable_x64", True)  # the library never flips this for you
import time
import warnings

import diffrax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import ddln_jax as dj

with warnings.catch_warnings():  # tqdm's notice about Jupyter widgets (the engine imports it)
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

FULL = False  # True: the full size (meant for an accelerator)
T0, C0 = time.perf_counter(), time.process_time()


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b))))


# %% [markdown]
# ## 1. Reverse mode through `simulate`
# A depth-3 network on least squares, u0 = α·v with a fixed layer shape v, run to t1 = 5 (still
# far from the minimum). One compiled `value_and_grad` gives f(θ(t1)) and its gradient with
# respect to α and to X; the same compiled function gives the central differences (step h).

# %%
n, d, L = 4, 8, 3
kx, kw, ke = jax.random.split(jax.random.PRNGKey(0), 3)
X = jax.random.normal(kx, (n, d))
theta_star = jnp.zeros(d).at[:2].set(jnp.array([1.0, -0.5]))
y = X @ theta_star
v = dj.layered_init([0.5, 1.0, 1.0], d) * (1 + 0.1 * jnp.arange(d) / d)
t1 = 5.0


def loss_at_t1(alpha, X):
    traj = dj.simulate(dj.LeastSquares(X, X @ theta_star), alpha * v, t1=t1,
                       ts=jnp.array([0.0, t1]), solver=diffrax.Tsit5(), rtol=1e-12, atol=1e-14)
    return traj.loss_final


vg = jax.jit(jax.value_and_grad(loss_at_t1, argnums=(0, 1)))
a0, h = 0.8, 1e-5
f0, (g_alpha, g_X) = vg(a0, X)
fd_alpha = (vg(a0 + h, X)[0] - vg(a0 - h, X)[0]) / (2 * h)
E = jax.random.normal(ke, (n, d))  # a random direction in data space
fd_X = (vg(a0, X + h * E)[0] - vg(a0, X - h * E)[0]) / (2 * h)
print(f"f(θ(t1)) = {float(f0):.6f}")
print(f"df/dα: grad {float(g_alpha):.10f}  central diff {float(fd_alpha):.10f}  "
      f"rel {rel(g_alpha, fd_alpha):.1e}")
print(f"⟨df/dX, E⟩: grad {float(jnp.vdot(g_X, E)):.10f}  central diff {float(fd_X):.10f}  "
      f"rel {rel(jnp.vdot(g_X, E), fd_X):.1e}")
assert rel(g_alpha, fd_alpha) <= 1e-6
assert rel(jnp.vdot(g_X, E), fd_X) <= 1e-6

# %% [markdown]
# ## 2. Forward mode: the derivative of the time to ε, with and without the lane engine
# Two scales α ∈ {0.7, 1.5}; each run stops when f ≤ ε f(θ0) (ε = 1e-6). Along the direction
# du0 = u0/α, `simulate_jvp` differentiates everything the run records; the tangent of `t_final`
# is d t_ε/dα (and the threshold itself moves with f(θ0)). The same call with `lanes=2` runs
# the batch on the lane engine in forward mode. Saving only at `ts = [0, t1]` keeps the save
# times from shaping the steps. The central differences use the primal output of the same
# compiled forward-mode call.

# %%
alphas = jnp.array([0.7, 1.5])
U = alphas[:, None, None] * v
loss = dj.LeastSquares(X, y)
kw_run = dict(t1=200.0, ts=jnp.array([0.0, 200.0]), stop_ratio=1e-6, rtol=1e-11, atol=1e-13)
traj, tan = dj.simulate_jvp(loss, U, U / alphas[:, None, None], **kw_run)
traj_e, tan_e = dj.simulate_jvp(loss, U, U / alphas[:, None, None], lanes=2, **kw_run)
assert np.all(traj.status_name == "event") and np.all(traj_e.status_name == "event")
h = 1e-6
t_plus = dj.simulate_jvp(loss, U * (1 + h / alphas)[:, None, None], U / alphas[:, None, None],
                         **kw_run)[0].t_final
t_minus = dj.simulate_jvp(loss, U * (1 - h / alphas)[:, None, None], U / alphas[:, None, None],
                          **kw_run)[0].t_final
fd_t = (t_plus - t_minus) / (2 * h)
print("t_ε           :", np.array2string(np.asarray(traj.t_final), precision=4))
print("d t_ε/dα  jvp :", np.array2string(np.asarray(tan.t_final), precision=8))
print("          lanes:", np.array2string(np.asarray(tan_e.t_final), precision=8))
print("   central diff:", np.array2string(np.asarray(fd_t), precision=8))
print(f"rel. differences: jvp vs central {rel(tan.t_final, fd_t):.1e}, "
      f"engine vs vmapped {rel(tan_e.t_final, tan.t_final):.1e}, "
      f"d θ_final/dα engine vs vmapped {float(jnp.max(jnp.abs(tan_e.theta_final - tan.theta_final))):.1e}")
print("steps (vmapped, engine):", np.asarray(traj.num_steps), np.asarray(traj_e.num_steps))
assert rel(tan.t_final, fd_t) <= 1e-6
assert rel(tan_e.t_final, fd_t) <= 1e-6
assert rel(tan_e.t_final, tan.t_final) <= 1e-7
assert float(jnp.max(jnp.abs(tan_e.theta_final - tan.theta_final))) <= 1e-5 * float(
    jnp.max(jnp.abs(tan.theta_final)))

# %% [markdown]
# The time to ε falls steeply with α (and d t_ε/dα is the slope of that curve at each α):

# %%
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(np.asarray(alphas), np.asarray(traj.t_final), "o", label="t_ε (simulated)")
for a, t, s in zip(np.asarray(alphas), np.asarray(traj.t_final), np.asarray(tan.t_final)):
    da = np.linspace(-0.12, 0.12, 5)
    ax.plot(a + da, t + s * da, "-", color="C1")
ax.plot([], [], "-", color="C1", label="tangent from d t_ε/dα (forward mode)")
ax.set(xlabel="α", ylabel="time to ε", yscale="log", title="time to ε and its derivative")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The implicit-bias limit, differentiated with respect to the data and the init
# For a scalar readout w·θ∞ (w random), `jax.grad` through `dj.implicit_bias_limit` gives its
# gradient with respect to X and to u0, by the implicit function theorem on the KKT system
# (Xθ = y, ∇Q(θ) = ∇Q(θ0) + Xᵀμ). (That the limit is where the flow ends is checked by
# simulation in section 4, and in notebook 05.)

# %%
u0 = 0.3 * v
w = jax.random.normal(kw, (d,))


def readout(X, u0):
    return jnp.dot(w, dj.implicit_bias_limit(X, X @ theta_star, u0).theta)


vg_lim = jax.jit(jax.value_and_grad(readout, argnums=(0, 1)))
r0, (gl_X, gl_u) = vg_lim(X, u0)
Eu = jax.random.normal(ke, (L, d))
h = 1e-6
fdl_X = (vg_lim(X + h * E, u0)[0] - vg_lim(X - h * E, u0)[0]) / (2 * h)
fdl_u = (vg_lim(X, u0 + h * Eu)[0] - vg_lim(X, u0 - h * Eu)[0]) / (2 * h)
print(f"⟨∂(w·θ∞)/∂X, E⟩ : {float(jnp.vdot(gl_X, E)):.10f} vs {float(fdl_X):.10f}  "
      f"rel {rel(jnp.vdot(gl_X, E), fdl_X):.1e}")
print(f"⟨∂(w·θ∞)/∂u0, E⟩: {float(jnp.vdot(gl_u, Eu)):.10f} vs {float(fdl_u):.10f}  "
      f"rel {rel(jnp.vdot(gl_u, Eu), fdl_u):.1e}")
assert rel(jnp.vdot(gl_X, E), fdl_X) <= 1e-6
assert rel(jnp.vdot(gl_u, Eu), fdl_u) <= 1e-6

# %% [markdown]
# ## 4. Worked example: learning an init shape that recovers sparse θ* from few samples
#
# **The task.** θ* ∈ ℝ^d (d = 20) has k = 3 nonzero entries of magnitude in [1, 2] and random
# signs; its support is drawn uniformly from a set S of 6 coordinates (a *support prior*, e.g.
# known-relevant features; the learner is never told S). We observe n = 6 Gaussian
# measurements y = Xθ*: enough to pin θ* down *if* one knew S, but far too few for the
# minimum-ℓ1 interpolator (the small-α limit of the uniform zero-first init, docs/math.md
# "Small initialization"), which needs about 2k log(d/k) ≈ 11 samples and usually fails.
#
# **The model.** Depth 3, a zero-first init with a per-coordinate scale,
# u¹ = 0, u² = u³ = α·exp(s) (α = 0.05). As α → 0 its flow's limit is the weighted-ℓ1
# interpolator with weights Φ_i(∞) ∝ exp(−s_i): a larger init in a coordinate makes it cheaper
# for the flow to use.
#
# **Learning.** Minimize the mean relative error ‖θ∞(s; X, y) − θ*‖²/‖θ*‖² over training
# problems drawn from the prior, by Adam on s, with gradients through the exact limit
# (`jax.vmap` over problems, implicit differentiation inside). Then test on fresh draws: the
# learned limit against the ℓ1 interpolator (`dj.weighted_l1_interpolator`) and the uniform
# init's limit, and simulate the learned init on one fresh problem to convergence.

# %%
d2, n2, k2, L2, alpha2 = 20, 6, 3, 3, 0.05
n_train, n_steps, n_test = (128, 200, 500) if FULL else (24, 25, 20)
rng = np.random.default_rng(0)
S = np.sort(rng.choice(d2, 6, replace=False))


def draw_problems(m, rng):
    X = rng.standard_normal((m, n2, d2))
    th = np.zeros((m, d2))
    for j in range(m):
        sup = rng.choice(S, k2, replace=False)
        th[j, sup] = rng.choice([-1.0, 1.0], k2) * rng.uniform(1, 2, k2)
    return X, np.einsum("mnd,md->mn", X, th), th


def shaped_init(s):
    a = alpha2 * jnp.exp(s)
    return jnp.stack([jnp.zeros(d2), a, a])


def limits(s, X, y):
    return jax.vmap(lambda X, y: dj.implicit_bias_limit(X, y, shaped_init(s)).theta)(X, y)


def objective(s, X, y, th):
    err = limits(s, X, y) - th
    return jnp.mean(jnp.sum(err**2, -1) / jnp.sum(th**2, -1))


X_tr, y_tr, th_tr = draw_problems(n_train, rng)
opt = optax.adam(0.2)


@jax.jit
def train_step(s, state):
    value, grad = jax.value_and_grad(objective)(s, X_tr, y_tr, th_tr)
    updates, state = opt.update(grad, state)
    return optax.apply_updates(s, updates), state, value


s = jnp.zeros(d2)
state = opt.init(s)
history = []
for _ in range(n_steps):
    s, state, value = train_step(s, state)
    history.append(float(value))
print(f"training objective: {history[0]:.3f} → {history[-1]:.2e} in {n_steps} Adam steps")
print("S (the prior's support set):", S.tolist())
print("learned s:", np.array2string(np.asarray(s), precision=1))

# %% [markdown]
# **What the learned shape encodes.** The support prior: every coordinate of S gets a larger
# init than every coordinate outside it, so the limit's ℓ1 weights are small on S and large off
# it — the flow first grows coordinates the prior makes likely. Checked below on fresh draws.

# %%
s_np = np.asarray(s)
off = np.setdiff1d(np.arange(d2), S)
assert history[-1] <= 0.1 * history[0], history[::10]
assert s_np[S].min() > s_np[off].max(), (s_np[S], s_np[off])
X_te, y_te, th_te = draw_problems(n_test, np.random.default_rng(1))
eval_limits = jax.jit(limits)
lim_learned = np.asarray(eval_limits(s, X_te, y_te))
lim_uniform = np.asarray(eval_limits(jnp.zeros(d2), X_te, y_te))
l1 = np.stack([dj.weighted_l1_interpolator(Xj, yj) for Xj, yj in zip(X_te, y_te)])


def rel_err(theta):
    return np.linalg.norm(theta - th_te, axis=-1) / np.linalg.norm(th_te, axis=-1)


TOL = 1e-2  # "recovered": relative error ≤ 1 %
rates = {name: float(np.mean(rel_err(t) <= TOL))
         for name, t in [("learned init's limit", lim_learned), ("uniform init's limit", lim_uniform),
                         ("min-ℓ1 interpolator", l1)]}
for name, r in rates.items():
    print(f"{name:>22}: recovers θ* in {100 * r:.0f}% of {n_test} fresh problems")
assert rates["learned init's limit"] >= 0.7
assert rates["min-ℓ1 interpolator"] <= 0.3
assert rates["learned init's limit"] >= rates["min-ℓ1 interpolator"] + 0.4

# %% [markdown]
# **Checked by simulation.** On the first fresh problem where the ℓ1 interpolator fails, the
# flow from the learned init, simulated to convergence (t1 = 10⁶; the default solver turns
# implicit on the long, stiff tail), ends at θ* (to 1 %) and at the predicted limit.

# %%
j = int(np.flatnonzero(rel_err(l1) > 0.1)[0])
traj = dj.simulate(dj.LeastSquares(jnp.asarray(X_te[j]), jnp.asarray(y_te[j])), shaped_init(s),
                   t1=1e6, ts=jnp.geomspace(1e-2, 1e6, 200).at[0].set(0.0), rtol=1e-10, atol=1e-12,
                   max_steps=200_000)
end = np.asarray(traj.theta_final)
err_sim = float(np.linalg.norm(end - th_te[j]) / np.linalg.norm(th_te[j]))
err_l1 = float(np.linalg.norm(l1[j] - th_te[j]) / np.linalg.norm(th_te[j]))
print(f"problem {j}: status {traj.status_name}, loss {float(traj.loss_final):.1e}; relative error "
      f"of the simulated end point {err_sim:.1e}, of the ℓ1 interpolator {err_l1:.2f}")
assert traj.status_name == "success"
assert err_sim <= TOL and err_l1 > 0.1
print(f"max |θ(t1) − θ∞(learned)| = {float(np.max(np.abs(end - lim_learned[j]))):.1e}")
assert float(np.max(np.abs(end - lim_learned[j]))) <= 1e-4

fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
axes[0].semilogy(history)
axes[0].set(xlabel="Adam step", ylabel="mean ‖θ∞ − θ*‖²/‖θ*‖²", title="learning the init shape")
colors = np.where(np.isin(np.arange(d2), S), "C2", "C7")
axes[1].bar(np.arange(d2), s_np, color=colors)
axes[1].set(xlabel="coordinate i", ylabel="learned s_i  (init scale α·e^{s_i})",
            title="learned shape (green: the prior's set S)")
axes[2].stem(np.arange(d2), th_te[j], linefmt="k-", markerfmt="ko", basefmt=" ", label="θ*")
axes[2].plot(np.arange(d2), end, "C2s", mfc="none", ms=9, label="flow from learned init")
axes[2].plot(np.arange(d2), l1[j], "C3x", ms=8, label="min-ℓ1 interpolator")
axes[2].set(xlabel="coordinate i", title=f"a fresh problem (n = {n2} samples)")
axes[2].legend(fontsize=8)
plt.tight_layout()
plt.show()
print(f"notebook time: {time.perf_counter() - T0:.1f} s wall, "
      f"{time.process_time() - C0:.1f} s CPU (all threads of this kernel)")
