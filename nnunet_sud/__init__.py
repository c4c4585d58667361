"""nnunet_sud: semi-supervised trainers for nnU-Net v2 (supervision by denoising and relatives)."""
__version__ = "0.1.0"
