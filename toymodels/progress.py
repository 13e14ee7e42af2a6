"""Progress reporters for long runs (:mod:`sublearn._common`): plain lines for terminals and
logs, a bar for notebooks, or nothing.

A run is a fixed amount of work, counted in units (for the MNIST experiment, one teacher
epoch of one chunk of seeds is one unit and a student epoch counts by its relative cost),
so every reporter can show how far along it is and estimate what is left.
"""

from sublearn._common import BarProgress, Progress, SilentProgress, TextProgress

__all__ = ["BarProgress", "Progress", "SilentProgress", "TextProgress"]
