"""``LabelDenoiserMixin``: what every trainer that uses the trained label-map denoiser shares.

The denoiser is SUD's a(.) (Young et al., "SUD: Supervision by Denoising for Medical Image
Segmentation", 2023, §3.4), trained once per dataset / plans / configuration / fold with
``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerLabelDenoiser``. Its users here: SUD and its
variants (``sud.py``, ``sud2.py``), SUD's mean-teacher extension, DAE uncertainty (Adiga V et
al., "Leveraging Labeling Representations in Uncertainty-Based Semi-supervised Segmentation",
MICCAI 2022; ``dae_uncertainty.py``) and post-denoising (``post_denoise.py``).

The mixin gives them one way to

* say whether a training needs the denoiser: ``needs_denoiser()`` (instance, reads the settings
  when asked; default True) and ``needs_denoiser_by_default()`` (class: the same question with
  the class's own settings, before any trainer exists; ``nnunet_sud.experiment`` asks it to
  train the denoiser first);
* check the labels (mutually exclusive classes: the denoiser works on softmax maps) and load the
  denoiser (``load_label_denoiser``: ``nnunet_sud.denoiser.loading.load_denoiser``, i.e.
  ``$nnUNet_denoiser`` or the default model folder, checked against the segmenter's plans), once,
  before anything is built; the checkpoint used goes into the training log;
* name the command that trains a matching denoiser (``denoiser_train_command``).

The loaded network is frozen, in eval mode, on ``self.device``, and is not part of
``self.network`` (post-denoising copies its weights into its composed network itself).
Imports run one way: this module uses ``nnunet_sud.denoiser``, nothing there imports a trainer.
"""
__all__ = ["LabelDenoiserMixin"]

import torch

from nnunet_sud.denoiser.loading import load_denoiser, train_command
from nnunet_sud.network_helpers import require_exclusive_classes


class LabelDenoiserMixin:
    """Mix into an ``nnUNetTrainer`` subclass (before it in the bases) that uses the label denoiser."""

    #: the loaded denoiser (``load_label_denoiser``); None until then or when not needed
    denoiser = None

    def needs_denoiser(self) -> bool:
        """Whether this training uses the denoiser (read when asked; a method overrides it when a
        setting switches the denoiser off, e.g. SUD with beta = 0)."""
        return True

    @classmethod
    def needs_denoiser_by_default(cls) -> bool:
        """``needs_denoiser()`` with the class's own settings (class attributes and derived
        defaults), asked before any trainer is built. Settings a variant assigns in ``__init__``
        are not seen here; ``needs_denoiser()`` of the instance sees them."""
        return bool(cls.__new__(cls).needs_denoiser())

    def denoiser_train_command(self) -> str:
        """The ``nnUNetv2_train ... -tr nnUNetTrainerLabelDenoiser`` command of the matching denoiser."""
        return train_command(self.plans_manager.dataset_name, self.configuration_name, self.fold,
                             self.plans_manager.plans_name)

    def load_label_denoiser(self) -> torch.nn.Module:
        """Check the labels, then load the denoiser if this training needs it and has none yet.

        Raises ``UserFacingError`` for region-based labels and for a missing, unfinished or
        mismatching denoiser (the message names the file and the training command). Returns
        ``self.denoiser`` (None when not needed).
        """
        require_exclusive_classes(self.label_manager, type(self).__name__)
        if self.needs_denoiser() and self.denoiser is None:
            self.denoiser = load_denoiser(self.plans_manager.dataset_name, self.plans_manager.plans_name,
                                          self.configuration_name, self.fold, self.device)
            self.print_to_log_file(f"label denoiser loaded from {self.denoiser.denoiser_info['checkpoint']}")
        return self.denoiser
