"""The one user-facing error type, caught at the CLI/HTTP edge and shown as one clear line."""


class RagloraError(Exception):
    """A problem the user can fix (bad input, missing artifact, bad config). Never a bug."""
