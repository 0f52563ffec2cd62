"""Weight initialisation: ``qlx.models.layers.next_params_key`` draws exactly the keys ``rngs.params()`` draws (so
every seeded model keeps its weights), eagerly and under a trace."""

import jax
import numpy as np
import pytest
from flax import nnx

from qlx.models.layers import next_params_key


def _keys(rngs, draw, n):
    return [np.asarray(jax.random.key_data(draw(rngs))) for _ in range(n)]


@pytest.mark.parametrize("make", [lambda: nnx.Rngs(3), lambda: nnx.Rngs(params=5, dropout=1)])
def test_next_params_key_equals_rngs_params(make):
    ours, flax_own = make(), make()
    for a, b in zip(_keys(ours, next_params_key, 5), _keys(flax_own, lambda r: r.params(), 5), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(ours.params.count[...]) == int(flax_own.params.count[...]) == 5

    @jax.jit
    def traced(key_data):  # the same under a trace, where build_model draws the abstract model first
        rngs = nnx.Rngs(params=jax.random.wrap_key_data(key_data))
        return jax.random.key_data(next_params_key(rngs)), jax.random.key_data(next_params_key(rngs))

    data = jax.random.key_data(jax.random.key(7))
    reference = nnx.Rngs(params=jax.random.key(7))
    for got in traced(data):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.key_data(reference.params())))
