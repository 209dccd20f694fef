import numpy as np
import pytest

from data_service import intervals as iv


def _grid_mask(rows, grid):
    m = np.zeros(len(grid), dtype=bool)
    for s, e in np.asarray(rows).reshape(-1, 2):
        m |= (grid >= s) & (grid < e)
    return m


@pytest.mark.parametrize("seed", range(20))
def test_set_operations_match_pointwise_definition(seed):
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1, 101, 5000)

    def rand_set(k):
        s = rng.uniform(0, 100, k)
        return np.stack([s, s + rng.uniform(0, 15, k)], axis=1)

    a, b = rand_set(rng.integers(0, 8)), rand_set(rng.integers(0, 8))
    ma, mb = _grid_mask(a, grid), _grid_mask(b, grid)
    assert np.array_equal(_grid_mask(iv.normalize(a), grid), ma)
    assert np.array_equal(_grid_mask(iv.union(a, b), grid), ma | mb)
    assert np.array_equal(_grid_mask(iv.intersect(a, b), grid), ma & mb)
    assert np.array_equal(_grid_mask(iv.subtract(a, b), grid), ma & ~mb)
    assert np.array_equal(iv.contains(iv.normalize(a), grid), ma)
    for out in (iv.normalize(a), iv.union(a, b), iv.intersect(a, b), iv.subtract(a, b)):
        assert iv.is_normalized(out)


def test_dilate_total_and_inside_mask():
    a = np.array([[0.0, 1.0], [3.0, 4.0]])
    assert iv.total(iv.dilate(a, 1.0)) == pytest.approx(6.0)  # [-1, 2] and [2, 5] merge
    assert len(iv.dilate(a, 1.0)) == 1
    rows = np.array([[0.2, 0.8], [0.5, 3.5], [3.0, 4.0]])
    assert iv.inside_mask(rows, a).tolist() == [True, False, True]
