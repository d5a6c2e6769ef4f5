"""Input checks of predictions (``service_core.validation.input_rows``): what they refuse, with
which message, and the bound on magnitudes, against numpy's own float limits."""

from __future__ import annotations

import re

import numpy as np
import pytest

from service_core.errors import InvalidInputError
from service_core.validation import input_rows


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_magnitude_bound_is_the_square_root_of_the_largest_float(dtype):
    bound = float(np.sqrt(np.float64(np.finfo(dtype).max)))
    row = np.zeros((1, 4))
    row[0, 2] = -bound
    assert input_rows(row, (4,), dtype).dtype == dtype
    row[0, 2] = -np.nextafter(bound, np.inf)
    with pytest.raises(InvalidInputError, match=r"beyond ±.*too large for the model's float"):
        input_rows(row, (4,), dtype)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_infinite_values_are_named_as_such(bad):
    row = np.ones((2, 3))
    row[1, 0] = bad
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        input_rows(row, (3,), np.float32)


def test_valid_rows_keep_their_values_in_the_model_shape():
    x = np.arange(12.0).reshape(2, 2, 3) / 7
    out = input_rows(x.tolist(), (6,), np.float32)
    assert out.shape == (2, 6)
    assert np.array_equal(out, x.reshape(2, 6).astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_regression_targets_beyond_the_fourth_root_of_the_largest_float_are_refused(dtype):
    """A target of 1e300 passed the API and made an addition's solve non-finite, failing the jobs
    batched with it: targets are bounded by max^(1/4) (α = O(y/λ), squared residuals)."""
    from service_core.validation import targets

    limit = float(np.finfo(dtype).max) ** 0.25
    ok = targets([[limit * 0.99, -1.0]], 1, "regression", 2, dtype)
    np.testing.assert_allclose(np.asarray(ok), [[limit * 0.99, -1.0]], rtol=1e-6)
    assert np.asarray(targets([limit * 0.5], 1, "regression", 1, dtype)).shape == (1, 1)
    for bad in ([[limit * 1.01, 0.0]], [[0.0, -1e300]]):
        with pytest.raises(InvalidInputError, match=re.escape(f"y has values beyond ±{limit:.1e}")):
            targets(bad, 1, "regression", 2, dtype)
