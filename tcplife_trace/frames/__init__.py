"""The offline frames: pandas DataFrames from recorded events, column-wise.

columns.py: the recorded columns (Columns) and the transitions frame; by_connection.py: the
state changes sorted by connection, shared by every frame; lifecycles.py: the lifecycles
frame; connections.py: state durations, summary, groupings; filters.py: a recording's own
filters applied again; leaks.py: the detectors' findings from a recording; schema.py: the
declared schema of every frame.
"""
from .columns import (STATE_CATEGORIES, Columns, addresses, decoded, factorize, first_rows, spelled, transitions,
                      wall_times)

__all__ = ["STATE_CATEGORIES", "Columns", "addresses", "decoded", "factorize", "first_rows", "spelled", "transitions",
           "wall_times"]
