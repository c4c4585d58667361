"""What nnunet_sud keeps in step across the processes of a multi-GPU (DDP) training, in one place.

``nnUNetv2_train ... -num_gpus N`` runs N processes; nnU-Net wraps ``self.network`` in
``DistributedDataParallel`` (weights broadcast from rank 0 when wrapped, gradients averaged in
every backward), splits the plans' batch size over the processes and all-gathers its logged
losses and validation counts. What nnunet_sud adds beside the network is kept in step here:

* extra networks with their own optimiser (the discriminators of SegMatch and DMNet,
  ``DiscriminatorMixin``): ``broadcast_module`` when built (each process draws its own random
  initialisation), ``average_gradients`` between their backward and their optimiser step. Their
  weights then stay identical on every process, and a step equals the step on the union of the
  processes' batches wherever the loss is a mean over equally many samples per process (DMNet's
  L_dis without padding), or its terms are weighted by ``union_mean_weights`` (SegMatch's L_D,
  whose labeled pairs per process follow nnU-Net's per-process oversampling).
* EMA teachers (``EMATeacher``) need nothing: they are built from the broadcast student and
  follow the student, which DDP keeps identical on every process.
* values logged per epoch: ``gather_concatenated`` (the union of all processes' per-step values),
  and target-quality counts are summed with ``all_reduce`` (``nnUNetTrainerSemiSupervised``).
* ``batch_share``: a global per-step count (the unlabeled batch) split as nnU-Net splits the
  labeled batch.
* files: the soft-target store is one folder shared by all processes (``SoftTargetStore`` locks a
  case file while it reads or updates it); snapshots are taken by rank 0 between two barriers
  (``nnUNetTrainerSUD.save_checkpoint``).

Every function here is a no-op (or the single-process value) when torch.distributed is not
initialised.
"""
from typing import Iterable

import numpy as np
import torch
from torch import distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Give every process rank ``src``'s parameters and buffers of ``module`` (as DDP does when it wraps)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


@torch.no_grad()
def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over all processes (one all-reduce).

    Parameters without a gradient count as a zero gradient (and get one), so that every process
    contributes the same tensors. Gradients scaled by a GradScaler may be averaged as they are
    (all processes use the same scale); an inf/NaN on one process reaches all, so all skip the step.
    """
    params = [p for p in parameters if p.requires_grad]
    if not is_distributed() or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def union_mean_weights(counts) -> list:
    """Per set of samples, the factor world * n_here / n_all (1.0 without DDP; 0.0 for a set no
    process has): a loss sum_k w_k mean_here(set k), averaged over the processes as
    ``average_gradients`` does, then equals sum_k mean over the union of set k, whatever each
    process's share n_here. One all-reduce of the counts."""
    counts = [float(n) for n in counts]
    if not is_distributed():
        return [1.0] * len(counts)
    total = torch.tensor(counts, dtype=torch.float64)
    dist.all_reduce(total)
    world = dist.get_world_size()
    return [world * n / t if t > 0 else 0.0 for n, t in zip(counts, total.tolist())]


def gather_concatenated(values: np.ndarray) -> np.ndarray:
    """The 1-d arrays of all processes, concatenated in rank order (``values`` itself without DDP)."""
    values = np.asarray(values).reshape(-1)
    if not is_distributed():
        return values
    gathered = [None for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, values)
    return np.concatenate(gathered)


def batch_share(global_size: int, world_size: int, rank: int) -> int:
    """This process's part of ``global_size`` samples per step, as nnU-Net splits the plans' batch
    size (``nnUNetTrainer._set_batch_size_and_oversample``): ``global_size // world_size``, one
    more for the first ``global_size % world_size`` ranks."""
    return global_size // world_size + (1 if rank < global_size % world_size else 0)
