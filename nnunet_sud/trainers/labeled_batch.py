"""``LabeledBatchMixin``: the labeled batch of the current step, for methods whose unlabeled loss needs it.

``self.labeled_step`` holds the labeled batch of the current step on the device (``data``,
``target``) and, once nnU-Net's loss has run on it, the network's ``output``, so that
``unlabeled_loss`` can use them (the base's ``train_step`` passes only the unlabeled batch).
The output is taken by wrapping ``self.loss`` (``LabeledOutputTap``), so the labeled forward runs
once. Used by SegMatch (the discriminator's labeled pairs) and DMNet (the discriminator's
labeled input and the labeled map).
"""
__all__ = ["LabeledBatchMixin", "LabeledOutputTap"]

from typing import Callable, Optional

import torch
from torch import nn

from nnunet_sud.network_helpers import full_resolution


class LabeledOutputTap(nn.Module):
    """Wraps a loss ``L(output, target)``; hands every ``output`` to ``sink`` before computing L."""

    def __init__(self, loss: nn.Module, sink: Callable):
        super().__init__()
        self.loss = loss
        self._sink = sink

    @property
    def weight_factors(self):
        return getattr(self.loss, "weight_factors", None)

    def forward(self, output, target):
        self._sink(output)
        return self.loss(output, target)


class LabeledBatchMixin:
    """``self.labeled_step``: the current step's labeled ``data``, ``target`` and network ``output``."""

    labeled_step: Optional[dict] = None

    def initialize(self):
        super().initialize()
        self.loss = LabeledOutputTap(self.loss, self._record_labeled_output)

    def _record_labeled_output(self, output):
        if self.labeled_step is not None and "output" not in self.labeled_step:
            self.labeled_step["output"] = output

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        self.labeled_step = {"data": data, "target": target}
        try:
            return super().train_step(dict(batch, data=data, target=target))  # .to() is then a no-op
        finally:
            self.labeled_step = None

    def labeled_segmentation(self) -> torch.Tensor:
        """The labeled batch's full-resolution label map (B, 1, *S) of the current step."""
        return full_resolution(self.labeled_step["target"])
