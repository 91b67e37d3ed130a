"""Errors raised for bad input. Each message says what was wrong and what to do instead."""


class AdaDecodeError(ValueError):
    """Base class: something the user passed cannot be used as given."""


class UnsupportedModelError(AdaDecodeError):
    """The model cannot be captured and split into decoder-layer segments."""


class HeadsMismatchError(AdaDecodeError):
    """An exit-heads file does not belong to the model (shape, layers or fingerprint differ)."""


class MissingPackageError(AdaDecodeError, ImportError):
    """A model or data package from the zoo is not installed; the message holds the pip command."""
