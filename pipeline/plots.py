"""The train stage's pictures (matplotlib, Agg): the confusion matrix, a dimensional task's predicted-vs-true
scatter, the learned layer weights. Apart from pipeline/metrics.py so that the fine-tune stages, which compute
metrics, do not depend on how results are drawn."""
from __future__ import annotations

import numpy as np


def plot_confusion(confusion: list[list[int]], labels: list[str], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(labels), 0.8 + 0.7 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_true_vs_predicted(true: np.ndarray, pred: np.ndarray, dims: list[str], path, title: str) -> None:
    """A dimensional task's picture in place of a confusion matrix: predicted against true, one panel per
    dimension (targets that are NaN are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dims), figsize=(3.2 * len(dims), 3.2), squeeze=False)
    for j, (dim, ax) in enumerate(zip(dims, axes[0])):
        ok = np.isfinite(true[:, j])
        ax.scatter(true[ok, j], pred[ok, j], s=6, alpha=0.5)
        ax.set_xlabel(f"true {dim}")
        ax.set_ylabel(f"predicted {dim}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_layer_weights(weights: dict[str, dict[str, float]], path, title: str) -> None:
    """One bar chart per layered modality: softmax weight by hidden-state index (0: the embeddings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(weights), figsize=(1.5 + 3.5 * len(weights), 3.0), squeeze=False)
    for ax, (m, w) in zip(axes[0], weights.items()):
        ax.bar([int(i) for i in w], list(w.values()), color="tab:blue")
        ax.axhline(1 / len(w), color="grey", linestyle=":", linewidth=1)   # the uniform mix it started from
        ax.set_xlabel(f"{m} hidden state (0: embeddings)")
        ax.set_ylabel("softmax weight")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
