"""Small pieces every user of an nnU-Net network needs, in one place.

* ``unwrap_network(net)``: the plain module inside torch.compile / DDP wrappers (shares the
  parameters), e.g. to reach ``.encoder``/``.decoder`` or to copy the network.
* ``full_resolution(output)``: the full-resolution logits of a network output (the first entry of
  nnU-Net's deep-supervision list), or of a deep-supervision list of targets.
* ``set_deep_supervision(net, enabled)``: switch ``.decoder.deep_supervision`` where there is one.
* ``labels_to_one_hot(seg, C)``: integer label maps -> one-hot class maps (B, C, *S).
* ``require_exclusive_classes(label_manager, who)``: the one check that a dataset's labels are
  mutually exclusive classes (softmax outputs), which SUD, the label denoiser and the
  uncertainty methods need; region-based set-ups (sigmoid outputs) are refused with a
  ``UserFacingError``.

A neutral layer: torch and ``nnunet_sud.errors`` only, so the losses, the denoiser and every
trainer may import it (docs/design.md, "Layers").
"""
__all__ = [
    "unwrap_network",
    "full_resolution",
    "set_deep_supervision",
    "labels_to_one_hot",
    "require_exclusive_classes",
]

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_sud.errors import UserFacingError


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers.

    The returned module shares parameters with ``network``.
    """
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel
    mod = network
    for _ in range(4):  # DDP(compile(net)) as nnU-Net builds it, or compile(DDP(net)), or plain
        if isinstance(mod, DistributedDataParallel):
            mod = mod.module
        elif isinstance(mod, OptimizedModule):
            mod = mod._orig_mod
        else:
            break
    return mod


def full_resolution(output: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """The full-resolution entry of a network output or target: the first of a deep-supervision
    list/tuple (nnU-Net orders them from full resolution down), or the tensor itself."""
    return output[0] if isinstance(output, (list, tuple)) else output


def set_deep_supervision(module: nn.Module, enabled: bool) -> None:
    """Switch deep supervision of an nnU-Net style network (``.decoder.deep_supervision``), if it has one."""
    decoder = getattr(module, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = enabled


def labels_to_one_hot(seg: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32,
                      has_channel_axis: Optional[bool] = None) -> torch.Tensor:
    """One-hot encoding of an integer label map.

    Args:
        seg: (B, 1, *spatial) integer labels (nnU-Net's target layout) when ``has_channel_axis`` is
            True, (B, *spatial) when it is False. Values outside ``[0, num_classes)`` (nnU-Net's
            ignore label, -1 padding) get an all-zero vector: after ``log_clip`` and softmax such
            voxels are uniform over the classes ("unknown").
        num_classes: C, classes including background.
        dtype: of the result.
        has_channel_axis: whether axis 1 is a channel axis (of size 1) to be replaced by the classes.
            Say it: a single-slice 2d case (1, Y, X) batched as (B, 1, Y, X) has no channel axis,
            but its first spatial axis has size 1 as well. ``None`` keeps the old guess (axis 1 of
            size 1 is the channel axis), which is wrong for exactly such maps.
    Returns:
        (B, C, *spatial) tensor of ``dtype``.
    """
    if has_channel_axis is None:
        has_channel_axis = seg.ndim >= 2 and seg.shape[1] == 1
    if has_channel_axis:
        if seg.ndim < 3 or seg.shape[1] != 1:
            raise ValueError(f"labels_to_one_hot: expected (B, 1, *spatial) labels, got shape {tuple(seg.shape)}")
        seg = seg[:, 0]
    seg = seg.long()
    valid = (seg >= 0) & (seg < num_classes)
    oh = F.one_hot(torch.where(valid, seg, torch.zeros_like(seg)), num_classes)
    oh = oh * valid[..., None]
    return oh.movedim(-1, 1).to(dtype)


def require_exclusive_classes(label_manager, who: str, advice: str = "Use plain integer labels in dataset.json.") -> None:
    """Raise ``UserFacingError`` unless the labels are mutually exclusive classes (softmax outputs).

    Args:
        label_manager: nnU-Net's ``LabelManager`` of the dataset.json in question.
        who: what needs the classes (a trainer's name, "the label denoiser <file>", ...), the
            start of the message.
        advice: what to do, the end of the message.
    """
    if label_manager.has_regions:
        regions: List = list(label_manager.foreground_regions)
        raise UserFacingError(
            f"{who} needs mutually exclusive classes (softmax maps), but the dataset.json defines region-based "
            f"labels (overlapping regions, sigmoid outputs): {regions}. {advice}")
