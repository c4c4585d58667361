"""nnunet_sud: semi-supervised trainers for nnU-Net v2 (supervision by denoising and relatives)."""
__version__ = "0.1.0"

# an nnunetv2 outside the supported range stops here, with the version found and the fix
from nnunet_sud.nnunet_compat import check_nnunetv2 as _check_nnunetv2  # noqa: E402

_check_nnunetv2()
