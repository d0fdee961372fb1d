"""Errors a user can cause; each message says what was wrong and what would be right."""


class SPDError(ValueError):
    """Base class of the errors spd-study raises for bad input."""


class ModelLoadError(SPDError):
    """A model or tokenizer could not be loaded from the given source."""


class ParallelConfigError(SPDError):
    """A tensor-parallel degree does not fit the model."""


class PlanError(SPDError):
    """An SPD plan is malformed or does not fit the model."""
