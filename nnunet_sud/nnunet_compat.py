"""Which nnunetv2 releases nnunet_sud works with, and the check that says so at import.

The range lives here only: setup.py reads ``NNUNETV2_MIN`` and ``NNUNETV2_BELOW`` from this file
(without importing the package) to build its requirement, and ``nnunet_sud/__init__.py`` calls
``check_nnunetv2()`` so that an unsupported nnU-Net stops at ``import nnunet_sud`` with the version
found, the supported range and the command that fixes it, instead of an ImportError from deep
inside a trainer module.

Why 2.8 is the oldest: nnU-Net looks for trainers outside its own package (``nnUNet_extTrainer``)
only since 2.8.0; 2.6.x and 2.7.0 also lack names that nnunet_sud imports: ``LocalLogger`` (2.6),
the module-level ``comp_blosc2_params`` and ``utilities.find_objects`` (2.6, 2.7). Releases before
2.6 have neither the blosc2 dataset classes nor the single ``nnUNetDataLoader`` the unlabeled
stream builds on. tests/test_nnunet_compat.py checks every ``from nnunetv2... import`` of the
package against the installed release.
2.8.0 and 2.8.1 do not differ in anything nnunet_sud imports, so nothing here switches on the
version inside the range. Should a later release move an API, the difference goes into this
module.

Deliberately light: only the standard library, no nnunetv2 or torch import.
"""
import re
from importlib import metadata

from nnunet_sud.errors import UserFacingError

#: oldest supported release (inclusive) and the first release not supported (exclusive)
NNUNETV2_MIN = "2.8"
NNUNETV2_BELOW = "2.9"
NNUNETV2_REQUIREMENT = f"nnunetv2>={NNUNETV2_MIN},<{NNUNETV2_BELOW}"


class UnsupportedNnUNetError(UserFacingError, ImportError):
    """nnunetv2 is missing or outside the supported range (an ImportError too, raised at import)."""


def _release(version: str) -> tuple:
    """The leading numeric part of a version string as a tuple of ints: '2.8.1.dev3' -> (2, 8, 1)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def is_supported(version: str) -> bool:
    rel = _release(version)
    # pre-releases of the first unsupported release ('2.9.0rc1' -> (2, 9, 0)) count as that release
    return bool(rel) and _release(NNUNETV2_MIN) <= rel < _release(NNUNETV2_BELOW)


def check_nnunetv2() -> str:
    """Return the installed nnunetv2 version; raise UnsupportedNnUNetError if it is missing or out of range."""
    fix = f'pip install "{NNUNETV2_REQUIREMENT}"'
    try:
        found = metadata.version("nnunetv2")
    except metadata.PackageNotFoundError:
        raise UnsupportedNnUNetError(
            f"nnunet_sud needs nnU-Net v2 ({NNUNETV2_REQUIREMENT}), but nnunetv2 is not installed in "
            f"this environment. Install it with: {fix}") from None
    if not is_supported(found):
        raise UnsupportedNnUNetError(
            f"nnunet_sud supports nnunetv2>={NNUNETV2_MIN},<{NNUNETV2_BELOW}, but nnunetv2 {found} is "
            f"installed. Switch to a supported release with: {fix} (in a separate virtual environment "
            f"if this one must keep nnunetv2 {found}); the README's installation section says why "
            f"older releases cannot work.")
    return found
