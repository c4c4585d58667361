# The folder of this file is what `nnunet-sud trainer-path` prints for nnUNet_extTrainer.
# nnU-Net imports it as a top-level module and drops it from sys.modules again; the classes are
# defined in the installed package, so they keep a picklable __module__. Re-exports only.
from nnunet_sud.trainers import *  # noqa: F401,F403
