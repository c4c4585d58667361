from setuptools import find_packages, setup

setup(
    name="nnunet_sud",
    version="0.1.0",
    description="Semi-supervised nnU-Net v2 trainers: supervision by denoising (SUD) and relatives",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunet_sud", "nnunet_sud.*"]),
    # nnunet_trainers/ is the folder nnUNet_extTrainer points at; ship it as package data too
    package_data={"nnunet_sud": ["nnunet_trainers/*.py", "nnunet_trainers/*.md"]},
    install_requires=[
        # tested against 2.8.1; the extension relies on nnUNet_extTrainer (>= 2.6) and on the
        # blosc2 on-disk format and unified data loader of 2.6+
        "nnunetv2>=2.6,<2.9",
        "torch>=2.1",
        "batchgenerators>=0.25",
        "batchgeneratorsv2>=0.3",
        "dynamic-network-architectures>=0.4",
        "SimpleITK>=2.2",
        "acvl-utils>=0.2",
        "h5py",
        "matplotlib",
        "scipy",
    ],
    extras_require={"test": ["pytest>=7", "medpy"]},
    entry_points={"console_scripts": ["nnunet-sud=nnunet_sud.cli:main"]},
)
