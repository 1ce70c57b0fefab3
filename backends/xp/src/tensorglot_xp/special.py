"""What the Array API standard lacks and the kernels need, written once from functions it has.

``erf``: exact GELU is z·Φ(z) with Φ(z) = (1 + erf(z/√2))/2, and the standard has no erf (nor erfc).
It is computed from two classical expansions that need only +, ×, ÷ and exp, each where it converges fast:

  * |x| < 1: the Maclaurin series erf(x) = 2/√π · Σₙ (−1)ⁿ x²ⁿ⁺¹ / (n! (2n + 1)), in Horner form
    (to x⁴¹: the last term is below 10⁻²⁰ at |x| = 1);
  * |x| ≥ 1: erf(x) = 1 − erfc(x) with Laplace's continued fraction
    erfc(x) = e^(−x²)/√π · 1/(x + ½/(x + 1/(x + (3/2)/(x + …)))), evaluated from the tail (200 levels:
    converged to float64 round-off from x = 1 on, and erfc ≤ 0.16 there, so 1 − erfc loses nothing).

e^(−x²) is taken as e^(−h²)·e^(−l·(x + h)) with h = x rounded to 8 fraction bits and l = x − h: h² is
exact, so the large exponent carries no rounding of x² (which would cost |x|² ulps). Measured against
mpmath: within 2 ulps on float64 (`tests/test_xp_special.py` checks it against math.erf). |x| ≥ 6 gives ±1,
as erfc(6) < 2⁻⁵⁴ (and keeps inf from reaching the split).
"""

from __future__ import annotations

import math
from typing import Any

from tensorglot.kernels import namespace

_SERIES_TERMS = 20
_FRACTION_LEVELS = 200


def erf(x: Any) -> Any:
    xp = namespace(x)
    a = xp.minimum(xp.abs(x), 6.0)  # NaN stays NaN
    small, large = xp.minimum(a, 1.0), xp.maximum(a, 1.0)
    s2, series = small * small, xp.full_like(small, 1.0 / (2 * _SERIES_TERMS + 1))
    for n in range(_SERIES_TERMS - 1, -1, -1):
        series = 1.0 / (2 * n + 1) - series * s2 / (n + 1)
    fraction = large
    for n in range(_FRACTION_LEVELS, 0, -1):
        fraction = large + (n / 2) / fraction
    h = xp.round(large * 256.0) / 256.0  # e^(−x²) = e^(−h²)·e^(−(x − h)(x + h)), h² exact
    erfc = xp.exp(-(h * h)) * xp.exp(-(large - h) * (large + h)) / (math.sqrt(math.pi) * fraction)
    y = xp.where(a < 1.0, (2 / math.sqrt(math.pi)) * small * series, 1.0 - erfc)
    return xp.copysign(y, x)
