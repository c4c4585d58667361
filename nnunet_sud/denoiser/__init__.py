"""Label-map denoisers (SUD §3.4): a skip-free auto-encoder planned by nnU-Net, trained on corrupted
label maps, and loaded by the trainers that need a shape prior.

Modules (imported on demand; this package import stays light for the CLI):

* ``network``    -- ``build_label_denoiser``: the plans' encoder + a decoder without skips.
* ``corruption`` -- ``LabelMapCorruption`` (log -> clip [-3, 0] -> coarse Gaussian noise -> softmax)
  and ``apply_denoiser`` (a segmenter's softmax -> denoised softmax, no gradient).
* ``trainer``    -- ``nnUNetTrainerLabelDenoiser`` (``nnUNetv2_train ... -tr nnUNetTrainerLabelDenoiser``).
* ``evaluation`` -- noisy vs denoised Dice / HD95 at fixed (sigma, s) (``denoiser_validation.json``).
* ``data``, ``preprocess`` -- extra label maps without images (``labelsDenoiser/``,
  ``nnunet-sud preprocess-denoiser-labels``).
* ``loading``    -- ``load_denoiser``: the trained denoiser for a segmenter's dataset / plans /
  configuration / fold (default model folder or ``$nnUNet_denoiser``); a checkpoint is a
  denoiser when it carries the ``label_denoiser`` entry the trainer writes (older ones: by name).

See docs/denoiser.md.
"""
