"""nnU-Net's per-epoch logger, extended by the values semi-supervised trainers report.

nnU-Net's ``LocalLogger`` keeps one list per key and refuses unknown keys; this subclass
registers the extra keys (unlabeled loss, its weight, schedule values such as alpha and beta),
fills keys missing from old checkpoints with NaN, and adds a fourth panel to ``progress.png``
below nnU-Net's three (drawn by nnU-Net's own code) with the unlabeled loss and the schedules.
"""
import math
import os
from typing import Iterable

from nnunetv2.training.logging.nnunet_logger import LocalLogger


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

    def plot_progress_png(self, output_folder):
        super().plot_progress_png(output_folder)  # nnU-Net's three panels -> progress.png
        if not self.extra_keys:
            return
        import matplotlib
        import matplotlib.pyplot as plt
        import numpy as np

        matplotlib.use("agg")
        epoch = min(len(v) for v in self.my_fantastic_logging.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        fig, ax = plt.subplots(1, 1, figsize=(30, 18))
        ax2 = ax.twinx()
        loss_keys = [k for k in self.extra_keys if "loss" in k]
        other = [k for k in self.extra_keys if k not in loss_keys]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
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
