"""The tensorglot conformance suite, shipped as a pytest plugin.

Run it on any installed backend::

    pytest --pyargs tensorglot.conformance --backend NAME [--xfails path/to/conformance-xfails.txt]

Every spec function is checked against the reference (the NumPy backend in float64) over a table of
dtypes and tolerances, each ``*_backward`` against float64 central differences, the laws that need no
oracle (softmax sums to one, RoPE keeps norms, causality, ...), the documented errors on bad input and
the signatures. What the backend does not declare in ``capabilities`` is skipped with the capability
as the reason; what it knowingly fails is listed, with a reason per line, in its xfails file.
"""

from ._harness import TOLERANCES as TOLERANCES
from ._harness import assert_close as assert_close
