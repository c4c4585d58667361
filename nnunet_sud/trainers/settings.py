"""The one form of a trainer's method settings: declared class attributes, read when used.

Every method setting of a trainer of nnunet_sud is a class attribute, listed by name in the
``SETTINGS`` tuple of the class that declares it (or gives it another default); ``__init__`` sets
state only (loaders, stores, counters). A variant therefore changes a setting either way, and
both take effect::

    class nnUNetTrainerSUD_lambda8(nnUNetTrainerSUD):
        lambda_max = 8.0                 # class attribute

    class MySUD(nnUNetTrainerSUD):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.lambda_max = 8.0        # nnU-Net's style: after super().__init__()

A default computed once from ``lambda_max`` (the weight ramp 0 -> lambda_max, SUD's
beta = 0.2 / lambda_max) would keep the old value when a variant changes ``lambda_max``.
``DerivedDefault`` computes it when it is read instead; assigning a value (in a class body or on
the instance) overrides it, and assigning ``None`` returns to the derived default.

``method_settings(cls)`` lists a trainer class's settings (the ``SETTINGS`` of every class in its
MRO); the trainer validates them in ``check_settings()``, at the start of training. nnU-Net's own
attributes (``num_epochs``, ``initial_lr``, ...) are set by ``nnUNetTrainer.__init__`` and are
changed after ``super().__init__()`` as in nnU-Net.
"""
from typing import Any, Callable, Dict

__all__ = ["DerivedDefault", "method_settings"]


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


def method_settings(cls: type) -> Dict[str, Any]:
    """The method settings of trainer class ``cls``: name -> the value the class declares (a
    ``DerivedDefault`` for a derived one), base classes' settings first.

    A setting is a name in the ``SETTINGS`` tuple of a class in ``cls.__mro__``; its value is the
    class attribute that ``cls`` resolves it to. Raises ``AttributeError`` for a listed name that no
    class declares.
    """
    names = {}
    for klass in reversed(cls.__mro__):
        names.update(dict.fromkeys(klass.__dict__.get("SETTINGS", ())))
    settings = {}
    for name in names:
        for klass in cls.__mro__:
            if name in klass.__dict__:
                settings[name] = klass.__dict__[name]
                break
        else:
            raise AttributeError(f"{cls.__name__} lists the setting {name!r} but no class declares it")
    return settings
