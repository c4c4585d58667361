"""What the trainers with a discriminator share (SegMatch, DMNet): the discriminator networks and
their optimiser/schedule/AMP scaler and checkpoint state. (Their access to the labeled batch is
``LabeledBatchMixin`` in ``labeled_batch.py``.)

``ConvDiscriminator``
    Strided convolutions built for a configuration of the plans (2d or 3d, down-sampling by the
    plans' first strides, so that every planned patch size divides). Two heads:
    ``"image"`` -- global average -> one logit per sample (SegMatch: "is this mask a good fit
    for this image?"); ``"dense"`` -- as many transposed convolutions as strided ones back to
    the input size, one logit per voxel (DMNet's FCN discriminator).

``DiscriminatorMixin`` (put before ``nnUNetTrainerSemiSupervised`` in the bases)
    ``build_discriminator()`` (the method's network) is called in ``initialize`` when
    ``needs_discriminator()``; the discriminator gets its own Adam optimiser
    (``discriminator_lr``, ``discriminator_weight_decay``), a poly learning-rate decay over
    the same epochs as nnU-Net's (stepped at each epoch start, like nnU-Net's), and on CUDA
    its own GradScaler. It is *not* part of ``self.network``: the saved ``network_weights``
    and ``nnUNetv2_predict`` use the segmenter only. Its weights, optimiser and scaler state
    go into the extra state beside each checkpoint and are restored by ``--c``.
    Training: the method computes the discriminator loss inside ``unlabeled_loss`` (so its
    forward runs in the same autocast as the segmenter's, on detached segmenter outputs) and
    passes it to ``queue_discriminator_loss``; the step runs in ``after_optimizer_step``,
    i.e. after the segmenter's update, as SegMatch's Algorithm 1 (lines 7-9).
    ``frozen_discriminator()`` is a context in which a forward gives gradients to its
    inputs (the segmenter) but none to the discriminator (DMNet's L_adv).
    Multi-GPU (DDP): the discriminator is not wrapped in DDP (after a ``frozen_discriminator``
    forward DDP would expect gradients that never come); instead its initial weights are
    broadcast from rank 0 and its gradients averaged over the processes before each step
    (``nnunet_sud.trainers.distributed``), so it stays identical on every process.

"""
import contextlib
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_sud.errors import UserFacingError
from nnunet_sud.trainers.distributed import average_gradients, broadcast_module


# ---------------------------------------------------------------------- networks
def plan_strides(configuration_manager, n: int = 3) -> Tuple[Tuple[int, ...], ...]:
    """The first ``n`` down-sampling strides of the plans' encoder (the stem's stride 1 skipped),
    padded with stride 1: a patch size of the plans is divisible by their product."""
    dim = len(configuration_manager.patch_size)
    strides = [tuple(int(s) for s in st) if isinstance(st, (list, tuple)) else (int(st),) * dim
               for st in configuration_manager.pool_op_kernel_sizes]
    down = strides[1:n + 1]
    return tuple(down + [(1,) * dim] * (n - len(down)))


class ConvDiscriminator(nn.Module):
    """Strided-convolution discriminator, 2d or 3d.

    Args:
        in_channels: channels of the input (SegMatch: image channels + classes; DMNet: classes).
        dim: 2 or 3.
        features: channels after each strided convolution (3x3(x3), padding 1).
        strides: one stride (per axis) per strided convolution.
        head: ``"image"``: global average pool -> 1x1 conv -> logits (B,); ``"dense"``:
            transposed convolutions (kernel = stride) in reverse order back to the input size,
            the last one to 1 channel -> logits (B, 1, *S).
        negative_slope: 0 for ReLU (DMNet: "each convolutional layer is followed by a ReLU"),
            e.g. 0.2 for LeakyReLU.
    Input (B, in_channels, *S) with S divisible by the product of ``strides``.
    """

    def __init__(self, in_channels: int, dim: int, features: Sequence[int] = (32, 64, 128),
                 strides: Sequence[Sequence[int]] = ((2, 2, 2),) * 3, head: str = "dense",
                 negative_slope: float = 0.0):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if head not in ("image", "dense"):
            raise ValueError(f"head must be 'image' or 'dense', got {head!r}")
        if len(features) != len(strides):
            raise ValueError("one feature count per stride needed")
        conv = nn.Conv3d if dim == 3 else nn.Conv2d
        convt = nn.ConvTranspose3d if dim == 3 else nn.ConvTranspose2d

        def act():
            return nn.ReLU(inplace=True) if negative_slope == 0 else nn.LeakyReLU(negative_slope, inplace=True)

        self.head = head
        down, c = [], in_channels
        for f, s in zip(features, strides):
            down += [conv(c, f, 3, tuple(s), 1), act()]
            c = f
        self.down = nn.Sequential(*down)
        if head == "image":
            self.out = conv(c, 1, 1)
        else:
            up = []
            outs = list(features[:-1])[::-1] + [1]
            for i, (f, s) in enumerate(zip(outs, list(strides)[::-1])):
                up.append(convt(c, f, tuple(s), tuple(s)))
                if i < len(outs) - 1:
                    up.append(act())
                c = f
            self.up = nn.Sequential(*up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.head == "image":
            return self.out(h).flatten(1).mean(1)
        return self.up(h)


# ---------------------------------------------------------------------- discriminator
class DiscriminatorMixin:
    """A discriminator with its own optimiser beside ``self.network`` (see module doc)."""

    SETTINGS = ("discriminator_lr", "discriminator_weight_decay", "discriminator_betas", "discriminator_poly_exponent")
    #: Adam learning rate, weight decay and betas of the discriminator
    discriminator_lr: float = 1e-4
    discriminator_weight_decay: float = 0.0
    discriminator_betas: Tuple[float, float] = (0.9, 0.999)
    #: poly exponent of its learning-rate decay over the epochs (nnU-Net's 0.9; None: constant)
    discriminator_poly_exponent: Optional[float] = 0.9

    discriminator: Optional[nn.Module] = None
    discriminator_optimizer = None
    discriminator_lr_scheduler = None
    discriminator_grad_scaler = None
    _pending_discriminator_loss = None

    def needs_discriminator(self) -> bool:
        return True

    def build_discriminator(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement build_discriminator")

    def initialize(self):
        super().initialize()
        if not self.needs_discriminator():
            return
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
        self.discriminator = self.build_discriminator().to(self.device)
        broadcast_module(self.discriminator)  # DDP: every process starts from rank 0's initialisation
        self.discriminator_optimizer = torch.optim.Adam(
            self.discriminator.parameters(), self.discriminator_lr, betas=tuple(self.discriminator_betas),
            weight_decay=self.discriminator_weight_decay)
        if self.discriminator_poly_exponent is not None:
            self.discriminator_lr_scheduler = PolyLRScheduler(self.discriminator_optimizer, self.discriminator_lr,
                                                              self.num_epochs, self.discriminator_poly_exponent)
        self.discriminator_grad_scaler = torch.GradScaler("cuda") if self.device.type == "cuda" else None

    def on_train_start(self):
        super().on_train_start()
        if self.discriminator is not None:
            n = sum(p.numel() for p in self.discriminator.parameters())
            self.print_to_log_file(f"discriminator: {type(self.discriminator).__name__} ({n} parameters), Adam lr "
                                   f"{self.discriminator_lr}, weight decay {self.discriminator_weight_decay}, "
                                   f"poly exponent {self.discriminator_poly_exponent}")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.discriminator is not None:
            self.discriminator.train()
            if self.discriminator_lr_scheduler is not None:
                self.discriminator_lr_scheduler.step(self.current_epoch)

    @contextlib.contextmanager
    def frozen_discriminator(self):
        """Forwards inside give gradients to the discriminator's inputs but not to its weights."""
        params = [p for p in self.discriminator.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield self.discriminator
        finally:
            for p in params:
                p.requires_grad_(True)

    def queue_discriminator_loss(self, loss: torch.Tensor):
        """Remember the discriminator's loss of this step; it is minimised after the segmenter's update."""
        self._pending_discriminator_loss = loss

    def after_optimizer_step(self):
        super().after_optimizer_step()
        loss, self._pending_discriminator_loss = self._pending_discriminator_loss, None
        if loss is None:
            return
        opt = self.discriminator_optimizer
        opt.zero_grad(set_to_none=True)  # also drops anything the segmenter's backward left there
        scaler = self.discriminator_grad_scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        average_gradients(self.discriminator.parameters())  # DDP: the same step on every process
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    # ------------------------------------------------------------------ checkpoint state
    _STATE_KEYS = ("discriminator_weights", "discriminator_optimizer")

    def get_extra_state(self) -> dict:
        state = super().get_extra_state()
        if not self.needs_discriminator():
            return state
        if self.discriminator is None:  # before initialize: announce the keys this trainer needs
            state.update({k: None for k in self._STATE_KEYS})
            return state
        state.update({
            "discriminator_weights": self.discriminator.state_dict(),
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
            "discriminator_grad_scaler": self.discriminator_grad_scaler.state_dict()
            if self.discriminator_grad_scaler is not None else None,
        })
        return state

    def set_extra_state(self, state: dict):
        super().set_extra_state(state)
        if not self.needs_discriminator():
            return
        missing = [k for k in self._STATE_KEYS if state.get(k) is None]
        if missing:
            raise UserFacingError(f"the extra checkpoint state of {type(self).__name__} lacks {', '.join(missing)} "
                                  f"(written by another trainer?): the discriminator cannot be restored. Start anew "
                                  f"without --c.")
        self.discriminator.load_state_dict(state["discriminator_weights"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        if self.discriminator_grad_scaler is not None and state.get("discriminator_grad_scaler") is not None:
            self.discriminator_grad_scaler.load_state_dict(state["discriminator_grad_scaler"])
