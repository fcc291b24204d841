"""Errors raised for bad configs, checkpoints and inputs. Each message names the problem."""


class TltError(Exception):
    """Base class of the errors this package raises on purpose."""


class ConfigError(TltError, ValueError):
    """A config key is unknown or a value is out of range."""


class CheckpointError(TltError):
    """A checkpoint is missing, unreadable, or does not match the model."""


class UnsupportedModelError(TltError):
    """The checkpoint describes an architecture this package does not implement."""


class InputError(TltError, ValueError):
    """A prompt batch or request does not fit the rollout (e.g. longer than the cache)."""


class DataError(TltError, ValueError):
    """A dataset is missing, empty, or lacks the configured fields."""
