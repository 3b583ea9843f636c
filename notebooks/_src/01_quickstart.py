# %% [markdown]
# # 01 · Quickstart: one deep diagonal linear network, four exact formulations
#
# A deep diagonal linear network of depth $L$ predicts with $\theta = u^1 \odot \dots \odot u^L$ and
# is trained by the gradient flow $\dot u^j = -\nabla_{u^j} f(u^1 \odot\dots\odot u^L)$. `ddln_jax`
# integrates that flow exactly (to solver tolerance) in four equivalent ways:
#
# | formulation | state | what it is |
# |---|---|---|
# | `"layer"` | the $L$ layers $u$ | the flow as written |
# | `"reduced"` | the smallest layer $w$ | the conserved gaps $\delta_j = (u^j)^2 - (u^m)^2$ eliminate the other layers |
# | `"mirror"` | $\theta$ | the mirror flow $\dot\theta = -g(\theta)\odot\nabla f(\theta)$ |
# | `"dual"` | $\eta = \nabla Q(\theta)$ | the dual flow $\dot\eta = -\nabla f(\nabla Q^*(\eta))$ |
#
# **Claim.** The four give the same $\theta(t)$ (to $10^{-8}$ relative), the gaps are conserved
# (to $10^{-10}$), and `simulate` is a JAX function: it batches, jits, vmaps and differentiates.

# %%
import diffrax
import jax

jax.config.update("jax_enable_x64", True)  # the library never flips this for you
import time
import warnings

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import ddln_jax as dj

FULL = False  # True: the full size (meant for an accelerator)
n, d, L = (50, 200, 3) if FULL else (10, 20, 3)
B = 256 if FULL else 32
T0 = time.perf_counter()
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

# %% [markdown]
# ## One network
# A sparse planted vector, a Gaussian design with fewer samples than unknowns (so the loss has
# many minimizers), and a Gaussian init of scale α = 0.5 at depth 3.

# %%
kx, ku, kb = jax.random.split(jax.random.PRNGKey(0), 3)
X = jax.random.normal(kx, (n, d))
theta_true = jnp.zeros(d).at[:3].set(jnp.array([1.0, -2.0, 1.5]))
y = X @ theta_true
loss = dj.LeastSquares(X, y)
u0 = dj.gaussian_init(ku, L, d, alpha=0.5)
print("Assumption A holds:", bool(dj.check_assumption_a(u0).holds))

# %% [markdown]
# ## The four formulations
# Same problem, same init, tight tolerances; we also record the conserved gaps.

# %%
t1 = 40.0
ts = jnp.linspace(0.0, t1, 201)
runs = {}
for form in ("layer", "reduced", "mirror", "dual"):
    start = time.perf_counter()
    runs[form] = dj.simulate(loss, u0, t1=t1, ts=ts, formulation=form, rtol=1e-11, atol=1e-13,
                             save=("conserved",))
    tr = runs[form]
    print(f"{form:8s} status={tr.status_name:8s} steps={int(tr.num_steps):5d} "
          f"f(θ(t1))={float(tr.loss_final):.3e}  ({time.perf_counter() - start:.1f} s incl. compile)")
    assert tr.status == dj.Status.success

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for form, tr in runs.items():
    axes[0].semilogy(tr.ts, tr.loss, label=form, lw=2 if form == "layer" else 1,
                     ls="-" if form in ("layer", "reduced") else "--")
axes[0].set(xlabel="t", ylabel="f(θ(t))", title=f"loss, L={L}, d={d}, n={n}")
axes[0].legend()
ref = runs["layer"]
for i in range(d):
    axes[1].plot(ref.ts, ref.theta[:, i], color="C0" if i < 3 else "0.6", lw=1.5 if i < 3 else 0.7)
axes[1].plot(runs["dual"].ts, runs["dual"].theta[:, :3], "k:", lw=1)
axes[1].set(xlabel="t", ylabel="θ_i(t)", title="θ(t): planted support (blue), others (grey); dual dotted")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Check: equivalence and conservation
# The relative sup-distance between each formulation's $\theta(t)$ and the layer flow's, over all
# saves; and the drift of the gaps $(u^j)^2-(u^m)^2$ along each run.

# %%
scale = float(jnp.max(jnp.abs(ref.theta)))
for form, tr in runs.items():
    err = float(jnp.max(jnp.abs(tr.theta - ref.theta))) / scale
    drift = float(tr.conservation_drift())
    print(f"{form:8s} rel. error vs layer = {err:.2e}   conservation drift = {drift:.2e}")
    assert err <= 1e-8, (form, err)
    assert drift <= 1e-10, (form, drift)
assert float(ref.loss_final) < 1e-3 * float(ref.loss[0])  # and it trains

# %% [markdown]
# ## A batch on the lane-refill engine
# `lanes=` runs a batch of inits as a queue on a fixed number of lanes: a lane whose run ends
# picks up the next one, so runs of very different lengths do not wait for the slowest.
# Here α spans a decade, so the runs need different step counts.

# %%
alphas = np.geomspace(0.2, 2.0, B)
keys = jax.random.split(kb, B)
U = jnp.stack([dj.gaussian_init(k, L, d, a) for k, a in zip(keys, alphas)])
U = U.at[0].set(u0)  # run 0 is the network above
start = time.perf_counter()
batch = dj.simulate(loss, U, t1=t1, ts=ts, lanes=8)
print(f"{B} runs in {time.perf_counter() - start:.1f} s, lane efficiency "
      f"{float(batch.stats['lane_efficiency'][0]):.2f}, steps from {int(batch.num_steps.min())} "
      f"to {int(batch.num_steps.max())}")
assert np.all(batch.succeeded)
# run 0 is the network above, here at the default tolerances (rtol 1e-8): same θ(t) to 1e-6
err0 = float(jnp.max(jnp.abs(batch[0].theta - ref.theta))) / scale
print(f"run 0 vs the layer flow above: rel. error {err0:.1e}")
assert err0 <= 1e-6, err0

# %%
fig, ax = plt.subplots(figsize=(6, 3.6))
sc = ax.scatter(alphas, batch.loss[:, -1], c=np.log10(alphas), s=12)
ax.set(xscale="log", yscale="log", xlabel="α", ylabel=f"f(θ(t={t1:g}))",
       title="final loss across the batch")
plt.show()

# %% [markdown]
# ## `simulate` is a JAX function
# The final loss as a function of the init scale α, differentiated (reverse mode through
# diffrax), vmapped over three α and jitted, in two lines. The gradient at the middle α is
# checked against a central finite difference from the outer two. This short run is not stiff,
# so it takes `diffrax.Tsit5()`, which compiles in a third of the time of the default `Auto`
# (which differentiates just as well).

# %%
v = dj.gaussian_init(ku, L, d, 1.0)
final_loss = lambda a: dj.simulate(loss, a * v, t1=5.0, rtol=1e-12, atol=1e-14,
                                   solver=diffrax.Tsit5()).loss_final
a0, h = 0.5, 1e-4
values, grads = jax.jit(jax.vmap(jax.value_and_grad(final_loss)))(jnp.array([a0 - h, a0, a0 + h]))
fd = (values[2] - values[0]) / (2 * h)
print(f"d f(θ(5))/dα at α={a0}: grad = {float(grads[1]):.8e}, finite difference = {float(fd):.8e}")
assert abs(float(grads[1] - fd)) <= 1e-6 * abs(float(fd)), (grads[1], fd)

# %%
elapsed = time.perf_counter() - T0
print(f"notebook compute time: {elapsed:.1f} s")
