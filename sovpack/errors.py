"""One error hierarchy: everything sovpack raises on purpose is a SovpackError.

The CLI catches only SovpackError, prints its message and exits 1 (UsageError: 2). Anything else is a bug and
keeps its traceback.

Which class each stage raises (one rule, whatever the target or transport):

- reading anything the user gave as input (checkpoint, tokenizer, config, artifact directory)  -> SourceError
- a target writer that cannot produce an artifact, or a family a target does not support  -> ConversionError
- a runtime failing on an artifact, or parity FAILED / impossible  -> ParityError
- bundle content, digests, signatures, attestations, policies that do not hold  -> VerificationError
- an OCI registry refusing or failing a request  -> RegistryError
- options that do not fit together or name something unknown  -> UsageError
- an optional runtime package that is not installed  -> MissingDependencyError

Errors caught from libraries are re-raised as one of these with ``raise ... from e``.
"""

from __future__ import annotations


class SovpackError(Exception):
    """A problem the user can act on; the message names the file and what is wrong."""


class SourceError(SovpackError):
    """The input checkpoint is missing, malformed, unsafe or unsupported."""


class ConversionError(SovpackError):
    """A target writer could not produce an artifact."""


class ParityError(SovpackError):
    """An artifact disagrees with the reference beyond its thresholds, or could not be checked."""


class VerificationError(SovpackError):
    """A bundle, signature or attestation failed verification."""


class RegistryError(SovpackError):
    """An OCI registry refused or failed a request."""


class UsageError(SovpackError):
    """Options that do not fit together or name something unknown."""


class MissingDependencyError(SovpackError):
    """An optional runtime is not installed; the message says which extra brings it."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"this needs the Python package {module!r}, which is not installed: "
            f"pip install 'sovpack[{extra}]'"
        )
        self.module = module
        self.extra = extra
