"""Training curves: ``log.csv`` drawn into the artifact (``curves.png``) at the end of ``hier train``, so
a run's course is one picture away (the seed write-ups watched TensorBoard for the same)."""
from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import MaxNLocator

from hier import fileio
from hier.drawing import pyplot


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss (train, validation) and validation top-1 against the epoch, written atomically."""
    epochs = [r["epoch"] for r in history]
    plt = pyplot()
    fig, (loss, top1) = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
    loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    if "val_log_loss" in history[-1]:
        loss.plot(epochs, [r.get("val_log_loss") for r in history], "o-", label="validation log loss")
        top1.plot(epochs, [r.get("val_top1") for r in history], "o-", color="tab:green")
    loss.set(xlabel="epoch", title="loss")
    loss.legend()
    top1.set(xlabel="epoch", title="validation top-1 per epoch (trained head)", ylim=(0, 1))
    for ax in (loss, top1):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # epochs are whole numbers
    try:
        fileio.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=80))
    finally:
        plt.close(fig)
