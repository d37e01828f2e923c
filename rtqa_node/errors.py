"""The exception hierarchy. Everything the project raises on purpose derives from :class:`RtqaError`.

Where an error meets the outside world it is mapped in one place: DICOM statuses in
``rtqa_node.dicom.statuses``, exit codes in ``rtqa_node.cli``, job states in ``rtqa_node.queue``.
"""


class RtqaError(Exception):
    """Base class of the project's own errors."""


class ConfigError(RtqaError):
    """A setting is missing or invalid (exit code 2)."""


class InputError(RtqaError):
    """The user's input cannot be used: a missing path, an unreadable or non-DICOM file (exit code 2)."""


class RetryableError(RtqaError):
    """A failure that may go away (a peer down, a locked database): retry with backoff."""


class PermanentError(RtqaError):
    """A failure that will not go away by retrying: dead-letter with the message."""
