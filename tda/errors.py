"""The science's error family.

Every error a user can cause in `tda` (a bad data file, a missing or mismatched model folder, an
influence query that cannot be answered) is one of these. `str(err)` is one line that names the file,
column or field at fault and says how to fix it; anything else is a bug and keeps its traceback.
They subclass `ValueError`, so code that already catches bad values keeps working.
"""

from __future__ import annotations


class TdaError(ValueError):
    """Base of the science's errors: `str(err)` is the complete one-line message."""


class DataError(TdaError):
    """A data source (file, sklearn dataset, table) is missing, malformed or unusable."""


class ModelError(TdaError):
    """A saved model folder is missing, unreadable, of an unknown family, or inconsistent."""


class InfluenceError(TdaError):
    """An influence computation was asked for something it cannot do (shapes, groups, solver)."""
