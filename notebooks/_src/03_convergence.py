# %% [markdown]
# # 03 · Convergence: the PL and 1/t bounds, and how depth and scale set the speed
#
# On least squares $f(\theta) = \tfrac1{2n}\|X\theta - y\|^2$ the flow is
# $\dot\theta = -g(\theta)\odot\nabla f(\theta)$ with a metric bounded below along every flow by
# $c_0 = \min_i\prod_{j\ne m_i}\delta_{j,i}$ (the gaps of the init; docs/math.md, "Convergence
# bounds"). Two bounds follow on the excess $f(\theta(t)) - f^*$:
#
# * **PL**: $\le (f(\theta_0) - f^*)\,e^{-2\mu c_0 t}$, with μ the PL constant of f
#   (the smallest positive eigenvalue of $XX^\top/n$);
# * **sublinear**: $\le D_Q(\theta^*, \theta_0)/t$ for any comparison point θ*.
#
# **Claims.** The measured loss stays below both bounds, and the decay rate is at least $2\mu c_0$.
# The time to reach a relative loss ε is at most $\ln(1/\varepsilon)/(2\mu c_0)$; depth makes
# small inits (α < 1) slower and large inits (α > 1) faster, because $c_0$ scales like
# $\alpha^{2(L-1)}$.

# %%
import jax

jax.config.update("jax_enable_x64", True)
import time

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dj

FULL = False  # True: the full size (meant for an accelerator)
n, d = (40, 200) if FULL else (10, 20)
T0 = time.perf_counter()
kx, ku = jax.random.split(jax.random.PRNGKey(3))
X = jax.random.normal(kx, (n, d))
y = X @ jnp.zeros(d).at[:3].set(jnp.array([1.0, -1.0, 0.5]))
loss = dj.LeastSquares(X, y)

# %% [markdown]
# ## The constants
# μ from `dj.pl_constant`, checked against the eigenvalues of $XX^\top/n$ (rank n, so the smallest
# one); $c_0$ from `dj.c0`, checked against the gaps computed by hand.

# %%
mu = dj.pl_constant(loss)
mu_np = np.linalg.eigvalsh(np.asarray(X @ X.T) / n).min()
assert abs(mu / mu_np - 1) <= 1e-10, (mu, mu_np)

L, alpha = 3, 0.7
u0 = dj.gaussian_init(ku, L, d, alpha)
sq = np.sort(np.asarray(u0) ** 2, axis=0)
c0_np = np.min(np.prod(sq[1:] - sq[:1], axis=0))
assert abs(float(dj.c0(u0)) / c0_np - 1) <= 1e-12
print(f"μ = {mu:.4f}, c0 = {c0_np:.3e}, guaranteed rate 2μc0 = {2 * mu * c0_np:.3e}")

# %% [markdown]
# ## The runs: depth × scale, and one Gaussian init
# For depths 2, 3, 4 and scales α < 1 and α > 1, inits α·v with the same layer shape v
# (smallest layer ½, the others 1, so θ0 = α^L/2 and every gap is ¾α²), run until the loss
# reaches ε·f(θ0) (`stop_ratio=ε`: an event located by root finding, so `t_final` is the exact
# hitting time). The Gaussian init above rides in the depth-3 batch. One vmapped call per depth
# (one compile each).

# %%
eps = 1e-8
depths = [2, 3, 4]
alphas = np.array([0.5, 0.7, 1.5, 2.0])
t1 = 1e4
ts = jnp.concatenate([jnp.zeros(1), jnp.geomspace(1e-3, t1, 400)])
t_eps, bound_t, runs = {}, {}, {}
for L in depths:
    v = dj.layered_init([0.5] + [1.0] * (L - 1), d)
    U = jnp.stack([a * v for a in alphas] + ([u0] if L == 3 else []))
    start = time.perf_counter()
    runs[L] = dj.simulate(loss, U, t1=t1, ts=ts, stop_ratio=eps, rtol=1e-10, atol=1e-14,
                          max_steps=200_000)
    assert np.all(np.asarray(runs[L].status_name) == "event"), runs[L].status_name
    t_eps[L] = np.asarray(runs[L].t_final[: len(alphas)])
    bound_t[L] = np.log(1 / eps) / (2 * mu * np.asarray(dj.c0(U[: len(alphas)])))
    print(f"L={L}: t_ε = {np.array2string(t_eps[L], precision=3)}   "
          f"({time.perf_counter() - start:.1f} s)")

# %% [markdown]
# ## One run against both bounds
# `dj.bound_report` takes the run, the loss and the init; its default comparison point for the 1/t
# bound is the implicit-bias limit (the interpolator closest to θ0 in $D_Q$, the tightest choice).

# %%
tr = runs[3][len(alphas)]  # the Gaussian init
rep = dj.bound_report(tr, loss, u0)
print(f"PL bound holds: {rep.pl_holds}, 1/t bound holds: {rep.sublinear_holds}")
print(f"measured late rate {rep.measured_rate:.3e} = {rep.rate_ratio:.1f} × 2μc0; "
      f"D_Q(θ*, θ0) = {rep.bregman0:.3f}")

fig, ax = plt.subplots(figsize=(7, 4))
ok = np.isfinite(rep.excess)
ax.loglog(rep.ts[ok], rep.excess[ok], "k", lw=2, label="f(θ(t)) − f*  (measured)")
ax.loglog(rep.ts, rep.pl, label="PL: (f(θ0) − f*) e^{−2μ c0 t}")
ax.loglog(rep.ts, rep.sublinear, label="1/t: D_Q(θ*, θ0)/t")
ax.axvline(float(tr.t_final), color="0.5", lw=0.6, ls=":")
ax.set(xlabel="t", ylabel="excess loss", ylim=(1e-10, 10 * rep.excess[0]),
       title=f"L=3, Gaussian α={alpha}: both bounds hold (run stopped at ε = {eps:g})")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# **Check.** Both bounds hold at every save (to 1e-9 of the initial excess), the late decay is at
# least the guaranteed rate, and the bounds are what their formulas say (the PL curve from
# `dj.pl_bound`, the 1/t curve from `dj.sublinear_bound`, with $D_Q$ from the init's geometry).

# %%
assert rep.pl_applicable and rep.sublinear_applicable
assert rep.pl_holds and rep.sublinear_holds
assert rep.rate_ratio >= 1.0, rep.rate_ratio
excess0 = float(tr.loss[0]) - float(loss.minimum())
assert np.all(rep.excess[ok] <= rep.pl[ok] + 1e-9 * excess0)
assert np.all(rep.excess[ok][1:] <= rep.sublinear[ok][1:] + 1e-9 * excess0)
assert np.allclose(rep.pl, dj.pl_bound(ts, excess0, mu, c0_np), rtol=1e-12)
geom = dj.Geometry(u0)
D0 = float(geom.bregman(jnp.asarray(rep.theta_star), u0.prod(axis=0)))
assert abs(D0 / rep.bregman0 - 1) <= 1e-10
assert np.allclose(rep.sublinear[1:], dj.sublinear_bound(ts[1:], D0), rtol=1e-10)

# %% [markdown]
# ## Depth × scale: time to reach ε

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for k, L in enumerate(depths):
    ax.loglog(alphas, t_eps[L], "o-", color=f"C{k}", label=f"L={L}")
    ax.loglog(alphas, bound_t[L], ":", color=f"C{k}", lw=1)
ax.axvline(1.0, color="0.5", lw=0.7)
ax.set(xlabel="α", ylabel=f"time to ε = {eps:g}",
       title="depth slows α < 1 and speeds α > 1 (dotted: PL guarantee)")
ax.legend()
plt.show()

# %% [markdown]
# **Check.** Every hitting time is below its PL guarantee ln(1/ε)/(2μc0); for each α < 1 the time
# grows with depth, for each α > 1 it shrinks with depth.

# %%
for L in depths:
    assert np.all(t_eps[L] <= bound_t[L] * (1 + 1e-9)), (L, t_eps[L], bound_t[L])
T = np.array([t_eps[L] for L in depths])  # (depth, α)
small, large = alphas < 1, alphas > 1
assert np.all(np.diff(T[:, small], axis=0) > 0), T[:, small]  # deeper → slower
assert np.all(np.diff(T[:, large], axis=0) < 0), T[:, large]  # deeper → faster

# %%
print(f"notebook compute time: {time.perf_counter() - T0:.1f} s")
