"""Matplotlib figures used by the CLI and the notebooks (Agg backend, files on disk)."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_trajectories(trajectories: dict, path=None, *, title: str | None = None):
    """Loss and θ paths of a few runs side by side.

    **Arguments:**

    - `trajectories`: `{label: Trajectory}` (single runs).
    - `path`: where to save the PNG (optional).

    **Returns:** the matplotlib figure.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_theta) = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = ["-", "--", ":", "-."]
    for k, (label, tr) in enumerate(trajectories.items()):
        ts, loss, theta = np.asarray(tr.ts), np.asarray(tr.loss), np.asarray(tr.theta)
        ax_loss.semilogy(ts, loss, styles[k % 4], label=label, lw=2 - 0.4 * k)
        top = np.argsort(-np.nanmax(np.abs(theta), axis=0))[:6]
        for j, i in enumerate(top):
            ax_theta.plot(ts, theta[:, i], styles[k % 4], color=f"C{j}", lw=1.6 - 0.3 * k,
                          label=label if j == 0 else None)
    ax_loss.set(xlabel="t", ylabel="f(θ(t))", title="loss")
    ax_theta.set(xlabel="t", ylabel="θ_i(t)", title="largest coordinates of θ")
    ax_loss.legend()
    ax_theta.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
