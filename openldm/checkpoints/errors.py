"""The error every checkpoint reader raises, importable without torch (the CLI catches it)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why."""
