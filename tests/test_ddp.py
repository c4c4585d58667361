"""Multi-GPU (DDP) code paths, run on the CPU: two processes with torch.distributed's gloo backend.

nnU-Net's ``-num_gpus`` needs CUDA, so the processes here build the real trainers as nnU-Net's
``run_ddp`` does (process group first, then the trainer, which sees ``is_ddp``), move them to the
CPU (nnU-Net sets ``cuda:<rank>`` under DDP) and wrap the student in DDP without ``device_ids``
(CPU modules take none); everything else is our trainers' own code: ``initialize``,
``train_step`` with its DDP student, ``after_optimizer_step`` (EMA teacher, discriminator step),
``on_train_epoch_end`` (gathered logs, summed target-quality counts), SUD's
``save_checkpoint``/``load_checkpoint`` (store snapshot between barriers) and the soft-target
store shared by both processes. Each process seeds torch differently, so anything not
synchronised differs between them.

All scenarios run in one pair of processes (``ddp_results``, one start-up for the file); each
test checks the invariants of one scenario on what both processes recorded.
"""
import copy
import os
from datetime import timedelta

import numpy as np
import pytest
import torch

WORLD = 2
PER_PROCESS = 2  # 2d batch size of the plans set to 4: 2 labeled patches per process


# ---------------------------------------------------------------------- the processes
def _make_trainer(name, dataset, seed):
    """Trainer ``name`` for Dataset991 2d built under DDP and moved to the CPU, initialised with
    torch seeded by ``seed`` (different per process)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    import nnunet_sud.trainers as trainers
    pre = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
    plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
    plans["continue_training"] = False
    plans["configurations"]["2d"]["batch_size"] = PER_PROCESS * WORLD
    t = getattr(trainers, name)(plans, "2d", 0, load_json(os.path.join(pre, "dataset.json")), torch.device("cpu"))
    assert t.is_ddp and t.device.type == "cuda"  # nnU-Net assumes CUDA under DDP ...
    t.device, t.grad_scaler = torch.device("cpu"), None  # ... this harness runs on the CPU
    torch.manual_seed(seed)
    t.initialize()
    assert t.batch_size == PER_PROCESS  # nnU-Net's split of the plans' batch size
    return t


def _batches(t, seed, keys=None, z=None, case_shape=None, seg=False):
    """A labeled batch and an unlabeled one of ``t.batch_size`` patches (random, from ``seed``).
    Unlabeled patch i lies unwarped in slice ``z[i]`` of case ``keys[i]`` (shape ``case_shape``)."""
    patch = tuple(t.configuration_manager.patch_size)
    b = t.batch_size
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (b, 1, *patch), generator=g).float()
    target = [labels if i == 0 else torch.nn.functional.interpolate(labels, scale_factor=tuple(s), mode="nearest")
              for i, s in enumerate(t._get_deep_supervision_scales())]
    yy, xx = torch.meshgrid(torch.arange(patch[0]), torch.arange(patch[1]), indexing="ij")
    z = z or [0] * b
    coords = torch.stack([torch.stack([torch.full(patch, float(zi)), yy.float(), xx.float()]) for zi in z])
    u = {"data": torch.randn((b, 1, *patch), generator=g), "valid": torch.ones((b, *patch), dtype=torch.bool),
         "coords": coords, "keys": keys or [f"u{i}" for i in range(b)],
         "case_shapes": torch.tensor([case_shape or (1, *patch)] * b)}
    u["strong_image"] = 1.2 * u["data"] + 0.1  # SegMatch's strong view (made by its loader workers in training)
    if seg:
        u["seg"] = torch.randint(0, 4, (b, *patch), generator=g)
        u["has_label"] = torch.ones(b, dtype=torch.bool)
    return {"data": torch.randn((b, 1, *patch), generator=g), "target": target}, u


def _steps(t, rank, n, **batch_kwargs):
    outputs = []
    for step in range(n):
        labeled, u = _batches(t, 1000 * rank + step, **batch_kwargs)
        t.dataloader_unlabeled = iter([u])
        outputs.append(t.train_step(labeled))
    return outputs


def _logged(t):
    return {k: v[-1] for k, v in t.logger.local_logger.my_fantastic_logging.items() if len(v)}


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _discriminator_scenario(name, rank, dataset):
    t = _make_trainer(name, dataset, seed=rank)
    initial = copy.deepcopy(t.discriminator)
    inputs = []  # per step: the input of the discriminator's own loss (the forward with trainable weights)
    t.discriminator.register_forward_pre_hook(
        lambda m, args: inputs.append(args[0].detach().clone()) if next(m.parameters()).requires_grad else None)
    outputs, weights, gradients = [], [], []
    for step in range(2):
        weights.append(_state(t.discriminator))
        outputs += _steps(t, rank + 10 * step, 1)
        gradients.append({n: p.grad.clone() for n, p in t.discriminator.named_parameters()})  # as stepped
    t.on_train_epoch_end(outputs)
    group = t.discriminator_optimizer.param_groups[0]
    return {"initial": initial, "inputs": inputs, "weights": weights, "gradients": gradients,
            "final": _state(t.discriminator), "student": _state(t.network.module), "outputs": outputs,
            "logged": _logged(t), "adam": {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}}


def _teacher_scenario(rank, dataset):
    t = _make_trainer("nnUNetTrainerMeanTeacher", dataset, seed=rank)
    t.unlabeled_cases_with_labels = ["some"]  # the batches carry labels: target quality is recorded
    teacher0, students = _state(t.teacher.module), [_state(t.network.module)]
    outputs = []
    for step in range(2):
        outputs += _steps(t, rank + 10 * step, 1, seg=True)
        students.append(_state(t.network.module))
    counts = {k: v.clone() for k, v in t._target_counts.items()}
    t.on_train_epoch_end(outputs)
    return {"teacher0": teacher0, "teacher": _state(t.teacher.module), "students": students,
            "ema_step": t.teacher.step, "counts": counts, "outputs": outputs, "logged": _logged(t)}


def _snapshot_scenario(rank, dataset):
    """TE (SUD without denoiser): each process writes its own case and its own slice of a shared
    case, a checkpoint snapshots the store, a later step changes it, --c restores the snapshot."""
    from torch import distributed as dist
    t = _make_trainer("nnUNetTrainerTE", dataset, seed=rank)
    t.prepare_method()  # rank 0 clears the store, all wait
    patch = tuple(t.configuration_manager.patch_size)
    where = {"keys": [f"own{rank}", "shared"], "z": [0, rank], "case_shape": (WORLD, *patch)}

    def mine(store):  # the slices this process writes (z = 0 of its own case, z = rank of the shared one)
        return {"own": store.load_case(f"own{rank}")[:, 0], "shared": store.load_case("shared")[:, rank]}
    _steps(t, rank, 1, **where)
    after_step = mine(t.store)  # only this process writes these voxels
    checkpoint = os.path.join(t.output_folder, "checkpoint_latest.pth")
    t.save_checkpoint(checkpoint)
    snapshot_folder = t._snapshot_dir("checkpoint_latest")
    snapshot = {"own": np.load(os.path.join(snapshot_folder, f"own{rank}.npy")).astype(np.float32)[:, 0],
                "shared": np.load(os.path.join(snapshot_folder, "shared.npy")).astype(np.float32)}
    _steps(t, rank + 10, 1, **where)
    after_next_step = mine(t.store)
    resumed = _make_trainer("nnUNetTrainerTE", dataset, seed=rank)
    resumed.load_checkpoint(checkpoint)
    resumed.prepare_method()  # the barrier after rank 0's restore
    restored = mine(resumed.store)
    dist.barrier()
    return {"after_step": after_step, "snapshot": snapshot, "after_next_step": after_next_step,
            "restored": restored, "world_share": [_make_share(resumed, n) for n in (3, 4, 1)]}


def _make_share(t, n):
    from nnunet_sud.errors import UserFacingError
    t.unlabeled_batch_size = n
    try:
        return t.unlabeled_batch_size_here()
    except UserFacingError as e:
        return str(e)


def _store_scenario(rank, folder):
    """Both processes write one store at the same moments: their own cases, and their own slice
    of the same new case (created by both at once), block-overlapping patches."""
    from torch import distributed as dist

    from nnunet_sud.targets.store import SoftTargetStore
    store = SoftTargetStore(folder, num_classes=2)
    shape, n_cases = (WORLD, 6, 6), 40
    yy, xx = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")

    def at(z):
        return torch.stack([torch.full((6, 6), float(z)), yy.float(), xx.float()])[None]
    valid, shapes = torch.ones((1, 6, 6), dtype=torch.bool), torch.tensor([shape])

    def value(r, i):
        v = (1 + r + WORLD * i) / 64  # exact in float16
        return torch.tensor([v, 1 - v]).view(1, 2, 1, 1).expand(1, 2, 6, 6)
    for i in range(n_cases):
        dist.barrier()
        store.write([f"own{rank}_{i}"], at(0), valid, shapes, value(rank, i))
        for _ in range(5):  # same case, adjacent slices: the blocks (+1 voxel margin) overlap
            store.write([f"case{i}"], at(rank), valid, shapes, value(rank, i))
    dist.barrier()
    read = {}
    for i in range(n_cases):
        for r in range(WORLD):
            read[(f"own{r}_{i}", r)] = store.read([f"own{r}_{i}"], at(0), valid, shapes)[0]
            read[(f"case{i}", r)] = store.read([f"case{i}"], at(r), valid, shapes)[0]
    expected = {(r, i): value(r, i)[0].clone() for r in range(WORLD) for i in range(n_cases)}
    leftovers = [f for f in os.listdir(folder) if f.startswith(".tmp")]
    return {"read": read, "expected": expected, "n_cases": n_cases, "leftovers": leftovers}


def _process(rank, out_dir, dataset):
    os.environ["nnUNet_results"] = os.path.join(out_dir, "results")  # before nnunetv2 reads it
    torch.set_num_threads(1)
    from torch import distributed as dist
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "rendezvous"), rank=rank,
                            world_size=WORLD, timeout=timedelta(minutes=10))
    # nnU-Net wraps with device_ids=[rank] (a GPU); a CPU module takes none
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from torch.nn.parallel import DistributedDataParallel
    nnunet_trainer_module.DDP = lambda module, device_ids=None, **kw: DistributedDataParallel(module, **kw)
    results = {
        "store": _store_scenario(rank, os.path.join(out_dir, "store")),
        "segmatch": _discriminator_scenario("nnUNetTrainerSegMatch", rank, dataset),
        "dmnet": _discriminator_scenario("nnUNetTrainerDMNet", rank, dataset),
        "teacher": _teacher_scenario(rank, dataset),
        "snapshot": _snapshot_scenario(rank, dataset),
    }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(synthetic3d, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    torch.multiprocessing.spawn(_process, args=(out, synthetic3d["name"]), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------- checks
def _equal_states(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _union_mean(results, key):
    return float(np.mean([o[key] for r in results for o in r["outputs"]]))


def _union_gradients(weights, initial, inputs, loss_fn):
    """Gradients of the discriminator loss on the union of the processes' batches, one process."""
    d = copy.deepcopy(initial)
    d.load_state_dict(weights)
    loss_fn(d, inputs).backward()
    return {n: p.grad for n, p in d.named_parameters()}


def _segmatch_loss(d, inputs):
    from nnunet_sud.losses.adversarial import segmatch_discriminator_loss
    # each process's input: its n labeled random crops with the ground truth, the same with their
    # predictions (the negatives), then its unlabeled pairs. n differs between the processes: nnU-Net
    # gives rank 0 of the plans' batch of 4 (3 random crops, 1 oversampled) 2 random crops, rank 1 one
    ns = [(x.shape[0] - PER_PROCESS) // 2 for x in inputs]
    truth = torch.cat([x[:n] for x, n in zip(inputs, ns)])
    predicted = torch.cat([x[n:2 * n] for x, n in zip(inputs, ns)])
    return segmatch_discriminator_loss(d(truth), d(predicted))


def _dmnet_loss(d, inputs):
    from nnunet_sud.losses.adversarial import dmnet_discriminator_loss
    # each process's input: decoder 1 and 2 on its labeled batch, the ground truth, decoder 1 and 2 on
    # its unlabeled batch (PER_PROCESS each; no padding)
    groups = [torch.cat(g) for g in zip(*[torch.split(x, PER_PROCESS) for x in inputs])]
    l1, l2, y, u1, u2 = [d(g) for g in groups]
    return dmnet_discriminator_loss([l1, l2], y) + dmnet_discriminator_loss([u1, u2], None)


def _max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _relative_difference(a, b):
    """max over tensors k of max |a_k - b_k| / max |b_k|"""
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in a)


@pytest.mark.parametrize("method,loss_fn", [("segmatch", _segmatch_loss), ("dmnet", _dmnet_loss)])
def test_discriminators_stay_identical_and_step_on_the_union_batch(ddp_results, method, loss_fn):
    r0, r1 = (r[method] for r in ddp_results)
    # the student is DDP's (broadcast, averaged gradients): identical
    assert _equal_states(r0["student"], r1["student"])
    # each process initialised its own discriminator from its own seed; rank 0's was broadcast
    assert _equal_states(_state(r0["initial"]), _state(r1["initial"]))
    assert len(r0["inputs"]) == len(r1["inputs"]) == 2 and not torch.equal(r0["inputs"][0], r1["inputs"][0])
    if method == "segmatch":  # unequal shares of labeled random crops (2 and 1): the weighted means meet the union
        assert [(x.shape[0] - PER_PROCESS) // 2 for x in (r0["inputs"][0], r1["inputs"][0])] == [2, 1]
    for step in range(2):
        # the same weights and the same (averaged) gradient on both processes at every step ...
        assert _equal_states(r0["weights"][step], r1["weights"][step])
        assert _equal_states(r0["gradients"][step], r1["gradients"][step])
        # ... equal to the gradient one process gets on the union of both processes' batches
        union = _union_gradients(r0["weights"][step], r0["initial"], (r0["inputs"][step], r1["inputs"][step]),
                                 loss_fn)
        assert _relative_difference(r0["gradients"][step], union) < 1e-4  # float rounding: ~1e-6 here
        # (rank 0's batch alone gives another one)
        alone = _union_gradients(r0["weights"][step], r0["initial"], (r0["inputs"][step],), loss_fn)
        assert _relative_difference(alone, union) > 1e-2
    assert _equal_states(r0["final"], r1["final"])
    # the weights moved (Adam: about lr per step and weight)
    assert _max_difference(r0["final"], _state(r0["initial"])) > r0["adam"]["lr"]


@pytest.mark.parametrize("method", ["segmatch", "dmnet", "teacher"])
def test_logged_epoch_values_are_means_over_both_processes_steps(ddp_results, method):
    results = [r[method] for r in ddp_results]
    keys = [k for k in results[0]["outputs"][0] if k != "loss"]
    assert "unlabeled_loss" in keys and len(results[0]["outputs"]) == 2
    differ = []  # keys whose mean over rank 0's steps alone is not the mean over all
    for k in keys:
        union = _union_mean(results, k)
        assert results[0]["logged"][k] == pytest.approx(union, rel=1e-12, nan_ok=True), k
        assert results[1]["logged"][k] == pytest.approx(results[0]["logged"][k], rel=0, nan_ok=True)
        if np.mean([o[k] for o in results[0]["outputs"]]) != pytest.approx(union, rel=1e-9):
            differ.append(k)
    assert differ
    # nnU-Net's own train loss, gathered the same way
    assert results[0]["logged"]["train_losses"] == pytest.approx(_union_mean(results, "loss"), rel=1e-6)


def test_ema_teacher_is_identical_on_both_processes_and_follows_the_shared_student(ddp_results):
    r0, r1 = (r["teacher"] for r in ddp_results)
    # built from the broadcast student: the same on both processes although they were seeded differently
    assert _equal_states(r0["teacher0"], r1["teacher0"]) and _equal_states(r0["teacher0"], r0["students"][0])
    for s0, s1 in zip(r0["students"], r1["students"]):
        assert _equal_states(s0, s1)
    assert _equal_states(r0["teacher"], r1["teacher"]) and r0["ema_step"] == r1["ema_step"] == 2
    # warm-up a_0 = 0, a_1 = 1/2: after two updates theta_t = (theta_s^1 + theta_s^2) / 2
    s1, s2 = r0["students"][1], r0["students"][2]
    for k, v in r0["teacher"].items():
        if v.dtype.is_floating_point:
            assert torch.allclose(v, (s1[k] + s2[k]) / 2, rtol=0, atol=1e-6), k
    assert not _equal_states(r0["teacher"], s2)


def test_target_quality_counts_are_summed_over_processes(ddp_results):
    r0, r1 = (r["teacher"] for r in ddp_results)
    assert set(r0["counts"]) == {"student", "teacher"}
    for name in ("student", "teacher"):
        tp, fp, fn = (r0["counts"][name] + r1["counts"][name]).double()
        assert (r0["counts"][name] != r1["counts"][name]).any()  # the processes saw different voxels
        expected = (2 * tp / (2 * tp + fp + fn)).tolist()
        key = f"target_dice/{name}"
        assert r0["logged"][key] == pytest.approx(expected, rel=1e-12) and r1["logged"][key] == r0["logged"][key]


def test_store_written_by_both_processes_holds_what_each_wrote(ddp_results):
    s = ddp_results[0]["store"]
    for i in range(s["n_cases"]):
        for r in range(WORLD):
            # its own case, and its slice of the case both processes created and wrote at once
            for key in (f"own{r}_{i}", f"case{i}"):
                for rank_result in ddp_results:  # read back by both processes
                    got = rank_result["store"]["read"][(key, r)]
                    assert torch.allclose(got, s["expected"][(r, i)], rtol=0, atol=1e-6), (key, r)
    assert not s["leftovers"] and not ddp_results[1]["store"]["leftovers"]


def test_snapshot_at_a_checkpoint_between_barriers_round_trips(ddp_results):
    for rank, res in enumerate(r["snapshot"] for r in ddp_results):
        for part in ("own", "shared"):
            written = res["after_step"][part]
            assert np.isfinite(written).all()  # the whole patch was written, by this process
            # rank 0 copied the store with what every process had written before the checkpoint ...
            snap = res["snapshot"][part] if part == "own" else res["snapshot"]["shared"][:, rank]
            assert np.array_equal(snap, written)
            # ... and nothing of the step after it; --c brings that store back
            assert not np.array_equal(res["after_next_step"][part], written)
            assert np.array_equal(res["restored"][part], written)


def test_unlabeled_batch_is_split_over_processes_as_nnunet_splits_the_labeled_batch(ddp_results):
    shares = [r["snapshot"]["world_share"] for r in ddp_results]
    assert [s[0] for s in shares] == [2, 1] and [s[1] for s in shares] == [2, 2]
    assert all("unlabeled_batch_size = 1" in s[2] and "-num_gpus" in s[2] for s in shares)
