"""Settings whose default follows other settings, read when used.

nnU-Net's style for a variant is a subclass that changes a setting after ``super().__init__()``::

    class nnUNetTrainerSUD_lambda8(nnUNetTrainerSUD):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.lambda_max = 8.0

A default computed in ``__init__`` from ``lambda_max`` (the weight ramp 0 -> lambda_max, SUD's
beta = 0.2 / lambda_max) would keep the old value there. ``DerivedDefault`` computes it when it is
read instead; assigning a value (in a class body or on the instance) overrides it, and assigning
``None`` returns to the derived default.
"""
from typing import Any, Callable


class DerivedDefault:
    """A trainer attribute whose default is ``default(trainer)``, evaluated at every read.

    Example: ``beta = DerivedDefault(lambda t: 0.2 / t.lambda_max)``.
    """

    def __init__(self, default: Callable[[Any], Any], doc: str = ""):
        self.default = default
        self.__doc__ = doc or getattr(default, "__doc__", None)

    def __set_name__(self, owner, name: str):
        self.name = name
        self.slot = "_setting_" + name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        value = obj.__dict__.get(self.slot)
        return self.default(obj) if value is None else value

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = value
