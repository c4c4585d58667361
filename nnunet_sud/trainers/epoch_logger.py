"""nnU-Net's per-epoch logger, extended by the values semi-supervised trainers report.

nnU-Net's ``LocalLogger`` keeps one list per key and refuses unknown keys; this subclass
registers the extra keys (unlabeled loss, its weight, schedule values such as alpha and beta),
fills keys missing from old checkpoints with NaN, and adds panels to ``progress.png`` below
nnU-Net's three (drawn by nnU-Net's own code): the unlabeled loss and the schedules, and, when
the trainer records target quality (``target_dice/<name>``: a list of per-class Dice per epoch;
``target_kept/<name>``: a fraction), the mean Dice over classes per map (solid) and the fraction
kept (dashed). Target keys are registered when first logged (``register``).
"""
import math
import os
from typing import Iterable

from nnunetv2.training.logging.nnunet_logger import LocalLogger

#: logger keys of the target-quality view: per-class Dice of a map, fraction of voxels kept
TARGET_DICE_KEY = "target_dice/"
TARGET_KEPT_KEY = "target_kept/"


class SemiSupervisedLocalLogger(LocalLogger):
    def __init__(self, extra_keys: Iterable[str], verbose: bool = False):
        super().__init__(verbose)
        self.extra_keys = list(dict.fromkeys(extra_keys))
        for k in self.extra_keys:
            self.my_fantastic_logging[k] = []

    def load_checkpoint(self, checkpoint: dict):
        n = len(checkpoint.get("train_losses", []))
        for k in self.extra_keys:
            checkpoint.setdefault(k, [math.nan] * n)
        super().load_checkpoint(checkpoint)

    def register(self, key: str, n_epochs: int) -> None:
        """Add ``key`` (if new) with NaN for the ``n_epochs`` epochs before it was first logged."""
        if key not in self.my_fantastic_logging:
            self.my_fantastic_logging[key] = [math.nan] * n_epochs

    def target_keys(self):
        return [k for k in self.my_fantastic_logging if k.startswith((TARGET_DICE_KEY, TARGET_KEPT_KEY))]

    def plot_progress_png(self, output_folder):
        super().plot_progress_png(output_folder)  # nnU-Net's three panels -> progress.png
        target_keys = self.target_keys()
        if not self.extra_keys and not target_keys:
            return
        import matplotlib
        import matplotlib.pyplot as plt
        import numpy as np

        matplotlib.use("agg")
        epoch = min(len(v) for v in self.my_fantastic_logging.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        n_panels = bool(self.extra_keys) + bool(target_keys)
        fig, axes = plt.subplots(n_panels, 1, figsize=(30, 18 * n_panels), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        if self.extra_keys:
            self._plot_unlabeled_panel(axes[0, 0], x, epoch, colors)
        if target_keys:
            self._plot_target_panel(axes[-1, 0], target_keys, x, epoch, colors)
        fig.tight_layout()
        extra_png = os.path.join(output_folder, ".progress_unlabeled.png")
        fig.savefig(extra_png, dpi=fig.dpi)
        plt.close(fig)
        # stack below nnU-Net's figure (same width in inches and dpi -> same pixel width)
        main_png = os.path.join(output_folder, "progress.png")
        top, bottom = plt.imread(main_png), plt.imread(extra_png)
        if top.shape[1] == bottom.shape[1] and top.shape[2] == bottom.shape[2]:
            plt.imsave(main_png, np.concatenate([top, bottom], axis=0))
        os.remove(extra_png)

    def _plot_target_panel(self, ax, keys, x, epoch, colors):
        """Mean over classes of ``target_dice/<name>`` per map (solid), ``target_kept/<name>`` (dashed)."""
        import warnings
        import numpy as np

        names = list(dict.fromkeys(k.split("/", 1)[1] for k in keys))
        for i, name in enumerate(names):
            color = colors[i % len(colors)]
            dice = self.my_fantastic_logging.get(TARGET_DICE_KEY + name)
            if dice is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN epochs
                    mean = [float(np.nanmean(np.asarray(v, dtype=np.float64))) for v in dice[:epoch + 1]]
                ax.plot(x, mean, color=color, ls="-", label=f"{name} (mean Dice)", linewidth=4)
            kept = self.my_fantastic_logging.get(TARGET_KEPT_KEY + name)
            if kept is not None:
                ax.plot(x, kept[:epoch + 1], color=color, ls="--", label=f"{name} (fraction kept)", linewidth=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("target Dice on labelled unlabeled voxels")
        ax.set_ylim(0, 1)
        ax.legend(loc=(0, 1))

    def _plot_unlabeled_panel(self, ax, x, epoch, colors):
        """Unlabeled loss (solid) and weights/schedules (dashed, right axis)."""
        ax2 = ax.twinx()
        loss_keys = [k for k in self.extra_keys if "loss" in k]
        other = [k for k in self.extra_keys if k not in loss_keys]
        for i, k in enumerate(loss_keys):
            ax.plot(x, self.my_fantastic_logging[k][:epoch + 1], color=colors[i % len(colors)], ls="-",
                    label=k, linewidth=4)
        for i, k in enumerate(other):
            ax2.plot(x, self.my_fantastic_logging[k][:epoch + 1], color=colors[(i + len(loss_keys)) % len(colors)],
                     ls="--", label=k, linewidth=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("unlabeled loss")
        ax2.set_ylabel("weights / schedules")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.3, 1))
