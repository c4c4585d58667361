"""How the augmentation workers the user allows are shared between the labeled and unlabeled streams.

nnU-Net starts ``nnUNet_n_proc_DA`` augmentation workers per GPU for its labeled stream (plus half
as many for validation). The semi-supervised trainers draw an unlabeled batch per labeled one, so
they split that count instead of doubling it: each stream gets workers in proportion to what one
of its batches costs one worker (measured at the start of training on a few batches of each
stream, in the main process, before any worker exists):

    n_unlabeled = round(n * c_u / (c_l + c_u))   clamped to [1, n - 1],   n_labeled = n - n_unlabeled

with c_l, c_u the seconds per batch of the labeled and unlabeled loaders (their batch sizes
included). Then both streams deliver batches at about the same rate, the rate that n workers
could sustain for the pair. ``n = 0`` keeps both single-threaded (nnU-Net's meaning of 0);
``n = 1`` gives the worker to the labeled stream and makes the unlabeled batches in the main
process; ``n = 2`` is one each, whatever the costs. nnU-Net's validation loader keeps its own rule
(``max(1, n_labeled // 2)`` workers, idle while training steps run).
"""
import contextlib
import math
import os
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

N_PROC_ENV = "nnUNet_n_proc_DA"


def split_augmentation_workers(total: int, labeled_cost: float, unlabeled_cost: float,
                               unlabeled_fraction: Optional[float] = None) -> Tuple[int, int]:
    """(labeled workers, unlabeled workers) summing to ``total`` (module doc).

    ``labeled_cost``/``unlabeled_cost``: seconds per batch of one worker; ``unlabeled_fraction``
    replaces the measured share c_u / (c_l + c_u) when given. Ties round in favour of the labeled
    stream.
    """
    total = int(total)
    if total <= 0:
        return 0, 0
    if total == 1:
        return 1, 0
    if unlabeled_fraction is None:
        both = float(labeled_cost) + float(unlabeled_cost)
        unlabeled_fraction = float(unlabeled_cost) / both if both > 0 else 0.5
    n_u = math.ceil(total * float(unlabeled_fraction) - 0.5)  # round half down
    n_u = min(max(n_u, 1), total - 1)
    return total - n_u, n_u


def seconds_per_batch(makers: Dict[str, Callable[[], object]], batches: int, warmup: int = 1) -> Dict[str, float]:
    """Median seconds per call of each maker ({name: callable making one batch}); ``warmup`` untimed
    calls each first (files opened, caches filled), then ``batches`` timed calls, interleaved."""
    for make in makers.values():
        for _ in range(warmup):
            make()
    times = {name: [] for name in makers}
    for _ in range(max(int(batches), 1)):
        for name, make in makers.items():
            t0 = time.perf_counter()
            make()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


@contextlib.contextmanager
def augmentation_processes(n: int):
    """Let nnU-Net's ``get_allowed_n_proc_DA`` (it reads ``nnUNet_n_proc_DA`` first) return ``n``
    inside the block; the user's setting is restored after it."""
    old = os.environ.get(N_PROC_ENV)
    os.environ[N_PROC_ENV] = str(int(n))
    try:
        yield
    finally:
        if old is None:
            del os.environ[N_PROC_ENV]
        else:
            os.environ[N_PROC_ENV] = old


def worker_count(augmenter) -> int:
    """Worker processes of a batchgenerators augmenter (0 for a single-threaded one)."""
    return int(getattr(augmenter, "num_processes", 0) or 0)


def describe_split(total: int, split: Sequence[int], costs: Optional[Dict[str, float]],
                   fraction: Optional[float] = None) -> str:
    n_l, n_u = split
    if costs:
        how = "measured s/batch: " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items())
    elif fraction is not None and total >= 3:
        how = f"unlabeled_worker_fraction = {fraction}"
    else:
        how = "fixed by the rule for this count"
    return (f"augmentation workers: {N_PROC_ENV}={total} split into {n_l} labeled + {n_u} unlabeled ({how}; "
            f"0 = made in the main process)")
