"""Exceptions raised by diffkit.

Every error that comes from bad user input derives from :class:`DiffkitError`; the
input-validation ones are also ``ValueError`` so generic handlers keep working.
"""


class DiffkitError(Exception):
    """Base class of all diffkit errors."""


class BadInputError(DiffkitError, ValueError):
    """Data of the wrong shape, dtype or content (NaN, empty frames, truncated file ...)."""


class MissingCalibrationError(DiffkitError, ValueError):
    """A calibration value the requested analysis needs is not set."""


class UnsafeCatalogError(DiffkitError, PermissionError):
    """A catalog names a class or module that is not on diffkit's allow-list."""


class ModelNotFoundError(DiffkitError, LookupError):
    """No shipped model matches the requested (material, zone, kV, convergence angle)."""


class ModelCardError(BadInputError):
    """A model card or the weights it names is malformed, inconsistent or fails its checksum."""
