"""Self-training with nnU-Net (``nnunet-sud self-train``): teacher -> pseudo-labels -> filtered ->
student on labeled + pseudo-labeled cases, for N rounds.

* :mod:`.filtering`: which pseudo-labeled cases and voxels a student learns from, and how good the
  pseudo-labels are against withheld labels (``labelsUnlabeled/``);
* :mod:`.denoise`: the label-map denoiser applied to a teacher's probabilities (offline SUD);
* :mod:`.student`: the student's nnU-Net dataset (raw folder, dataset.json with the ignore label,
  splits that keep the teacher's validation and test cases out of its training);
* :mod:`.pipeline`: the resumable steps and the command line.

See docs/self_training.md.
"""
