"""One owner for "is this a finite number": the check every client, config and adapter-file number takes."""

from __future__ import annotations

import math


def finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite as a float: NaN, the infinities and integers too large for
    a float (a client's 401 digits, on which math.isfinite raises OverflowError) are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
