"""The learning-rate schedule of ``qlx.train.optim`` against its formula, computed by hand."""

import math

import pytest

from qlx.config import ConfigError, OptimizerConfig
from qlx.train.optim import learning_rate_schedule


def test_constant_and_warmup():
    assert float(learning_rate_schedule(OptimizerConfig(learning_rate=0.5))(123)) == pytest.approx(0.5)
    warm = learning_rate_schedule(OptimizerConfig(learning_rate=0.4, warmup_steps=10))
    assert [float(warm(s)) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.2, 0.4, 0.4])


@pytest.mark.parametrize("warmup", [0, 4])
def test_cosine_decay_follows_the_formula(warmup):
    lr, frac, decay = 0.3, 0.2, 20
    schedule = learning_rate_schedule(
        OptimizerConfig(learning_rate=lr, warmup_steps=warmup, decay_steps=decay, final_lr_fraction=frac)
    )
    end = lr * frac
    for s in (0, 1, 7, 10, 19, 20, 35):
        expected = end + (lr - end) * (1 + math.cos(math.pi * min(s, decay) / decay)) / 2
        assert float(schedule(warmup + s)) == pytest.approx(expected, rel=1e-5), s
    if warmup:
        assert float(schedule(warmup // 2)) == pytest.approx(lr / 2)


def test_bad_decay_settings_name_the_key():
    with pytest.raises(ConfigError, match="decay_steps"):
        OptimizerConfig(decay_steps=-1)
    with pytest.raises(ConfigError, match="final_lr_fraction"):
        OptimizerConfig(final_lr_fraction=1.5)
