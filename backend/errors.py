"""Errors that reach a person: each carries a stable code (for the wire and for tests) and a
message that names the problem. Library code raises these, never SystemExit: deciding how a
process ends is the command line's job."""


class OccnetError(Exception):
    """A failure the user can act on. `code` is a short machine-readable slug."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:  # the message alone: it is what a person reads
        return self.message


class Cancelled(Exception):
    """Raised inside a reconstruction when the caller asked to stop."""


class CheckpointError(OccnetError):
    def __init__(self, message: str):
        super().__init__("bad_checkpoint", message)


class InputError(OccnetError):
    def __init__(self, message: str):
        super().__init__("bad_input", message)


class OutputError(OccnetError):
    def __init__(self, message: str):
        super().__init__("bad_output", message)


class MissingPackageError(OccnetError):
    """An optional feature was asked for but the package it needs is not installed."""

    def __init__(self, feature: str, package: str):
        super().__init__("missing_package", f"{feature} needs the {package} package "
                                            f"(pip install {package})")
        self.package = package
