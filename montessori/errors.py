"""Errors that stop a stage with a message a user can act on (file, line or config key)."""


class MontessoriError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(MontessoriError):
    """A config key is missing, unknown or has a bad value."""


class DataError(MontessoriError):
    """An input file is malformed, empty or incomplete."""


class ModelError(MontessoriError):
    """A model cannot be found or loaded."""
