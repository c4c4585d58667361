"""The test layer's own promises: the stored plans are what nnU-Net plans for the synthetic task,
and a trainer built on them is the trainer built on the real preprocessed dataset."""
import torch

from helpers import load_plans, make_trainer


def test_stored_plans_are_what_nnunet_plans_for_the_synthetic_task(synthetic3d, synthetic_plans):
    planned, planned_json = load_plans(synthetic3d)
    stored, stored_json = load_plans(synthetic_plans)
    assert stored_json == planned_json
    assert stored.pop("dataset_name") == synthetic_plans["name"]
    assert planned.pop("dataset_name") == synthetic3d["name"]
    assert stored == planned  # if nnU-Net plans differently now, refresh tests/data/synthetic3d_plans.json


def test_trainer_on_stored_plans_has_the_planned_network_and_its_own_folders(synthetic3d, synthetic_plans):
    from nnunet_sud.trainers import nnUNetTrainerSUD
    torch.manual_seed(0)
    a = make_trainer(nnUNetTrainerSUD, synthetic_plans, initialize=True)
    torch.manual_seed(0)
    b = make_trainer(nnUNetTrainerSUD, synthetic3d, initialize=True)
    sa, sb = a.network.state_dict(), b.network.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.batch_size == b.batch_size == 2 and a.configuration_manager.patch_size == [24, 32, 32]
    assert synthetic_plans["name"] in a.output_folder and synthetic3d["name"] not in a.output_folder
    assert a.my_init_kwargs["plans"]["dataset_name"] == synthetic_plans["name"]
