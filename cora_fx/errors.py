"""What cora_fx raises and warns: every error names the module or argument at fault and what to do."""
from __future__ import annotations


class CoRaError(RuntimeError):
    """A model cannot be handled as asked; the message names the module or argument."""


class CoRaTraceError(CoRaError):
    """The model could not be traced; ``module`` is the innermost failing qualified name."""

    def __init__(self, message: str, module: str) -> None:
        super().__init__(message)
        self.module = module


class CoRaLoadError(CoRaError):
    """A file cannot be loaded as a cora_fx artifact; the message names the file."""


class CoRaFloatWeightsWarning(UserWarning):
    """`prepare_cora` left weights float that the config did not ask to keep float; ``summary().skipped`` says why."""


class CoRaDeprecationWarning(DeprecationWarning):
    """A deprecated input that still works: a saved config in the flat layout of releases before 0.3."""
