"""The models' errors: a model that cannot be used, a family that cannot be decided."""

from __future__ import annotations

from sdbatch.errors import BadInput


class ModelError(BadInput, ValueError):
    """The model cannot be used: the message names the model and the fix."""


class FamilyError(BadInput, ValueError):
    """The folder is not a model family sdbatch runs; the message names the class and the fix."""
