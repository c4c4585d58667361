import ast
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def nnunetv2_requirement() -> str:
    """The supported nnunetv2 range, read from nnunet_sud/nnunet_compat.py (its one place) without
    importing the package (that import checks the installed nnunetv2)."""
    consts = {}
    with open(os.path.join(HERE, "nnunet_sud", "nnunet_compat.py"), encoding="utf-8") as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and node.targets[0].id in ("NNUNETV2_MIN", "NNUNETV2_BELOW"):
                consts[node.targets[0].id] = ast.literal_eval(node.value)
    return f"nnunetv2>={consts['NNUNETV2_MIN']},<{consts['NNUNETV2_BELOW']}"


setup(
    name="nnunet_sud",
    version="0.1.0",
    description="Semi-supervised nnU-Net v2 trainers: supervision by denoising (SUD) and relatives",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunet_sud", "nnunet_sud.*"]),
    # nnunet_trainers/ is the folder nnUNet_extTrainer points at; ship it as package data too
    package_data={"nnunet_sud": ["nnunet_trainers/*.py", "nnunet_trainers/*.md"]},
    install_requires=[
        # 2.8.x: the first releases with nnUNet_extTrainer; why, and what is tested: nnunet_compat.py
        nnunetv2_requirement(),
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
