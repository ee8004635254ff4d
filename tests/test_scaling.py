"""Learning-rate scaling and warmup rules against the published cases and their own definitions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bsplan.planning.errors import BadInput
from bsplan.planning.scaling import (
    GOYAL, LAMB, MA_YARATS, MALLADI, LearningRate, Schedule, adam_warmup_steps, choose_warmup, scale_learning_rate,
)

IMAGENET = 1_281_167  # ImageNet-1k training images, as in Goyal et al. 2017


def _warmup(optimizer: str, rate: LearningRate | None, schedule: Schedule | None = None, beta2: float = 0.999, **given: float):
    values = {"warmup_steps": None, "warmup_epochs": None, "warmup_ratio": None, **given}
    return choose_warmup(optimizer=optimizer, beta2=beta2, learning_rate=rate, schedule=schedule, **values)  # type: ignore[arg-type]


def test_goyal_256_at_0_1_becomes_8192_at_3_2_with_5_epochs_of_warmup() -> None:
    rate = scale_learning_rate(0.1, 256, 8192, "auto", "sgd")
    assert (rate.value, rate.rule, rate.factor) == (3.2, "linear", 32.0)
    assert GOYAL in rate.source
    schedule = Schedule.of(IMAGENET, 90, 8192)
    assert (schedule.steps_per_epoch, schedule.total_steps) == (157, 90 * 157)
    warmup = _warmup("sgd", rate, schedule)
    assert warmup is not None
    assert (warmup.steps, warmup.epochs, warmup.start_lr) == (5 * 157, 5, 0.1)  # from the reference rate up to 3.2
    assert warmup.source == GOYAL


def test_adam_scales_by_the_square_root_of_the_batch_ratio() -> None:
    # 16x the batch: 4x the rate (Malladi et al. 2022's square-root rule for adaptive methods).
    rate = scale_learning_rate(1e-3, 256, 4096, "auto", "adamw")
    assert (rate.value, rate.rule, rate.factor) == (4e-3, "sqrt", 4.0)
    assert MALLADI in rate.source


def test_lamb_follows_its_paper_with_the_square_root_rule() -> None:
    # 512 to 32K is 64x the batch: sqrt(64) = 8x the rate.
    rate = scale_learning_rate(5e-3 / 8, 512, 32768, "auto", "lamb")
    assert (rate.value, rate.rule) == (5e-3, "sqrt")
    assert LAMB in rate.source


def test_lars_starts_from_the_sgd_rule_and_says_to_tune() -> None:
    rate = scale_learning_rate(0.1, 256, 1024, "auto", "lars")
    assert (rate.value, rate.rule) == (0.4, "linear")
    assert "tune" in rate.source


@pytest.mark.parametrize(("scaling", "expected"), [("linear", 0.8), ("sqrt", 0.1 * math.sqrt(8)), ("none", 0.1)])
def test_an_explicit_scaling_overrides_the_optimizers_rule(scaling: str, expected: float) -> None:
    assert scale_learning_rate(0.1, 256, 2048, scaling, "adam").value == pytest.approx(expected, rel=1e-5)


@given(base=st.floats(1e-6, 10), base_batch=st.integers(1, 4096), batch=st.integers(1, 65536))
def test_the_rules_are_their_formulas(base: float, base_batch: int, batch: int) -> None:
    k = batch / base_batch
    assert scale_learning_rate(base, base_batch, batch, "linear", "sgd").value == pytest.approx(base * k, rel=1e-5)
    assert scale_learning_rate(base, base_batch, batch, "sqrt", "sgd").value == pytest.approx(base * math.sqrt(k), rel=1e-5)


@pytest.mark.parametrize(("beta2", "steps"), [(0.999, 2000), (0.98, 100), (0.95, 40), (0.9995, 4000)])
def test_ma_and_yarats_warmup_is_2_over_1_minus_beta2(beta2: float, steps: int) -> None:
    assert adam_warmup_steps(beta2) == steps


def test_adam_warms_up_for_2_over_1_minus_beta2_steps_even_without_a_recipe() -> None:
    warmup = _warmup("adamw", None, Schedule.of(100_000, None, 1000))
    assert warmup is not None
    assert (warmup.steps, warmup.epochs, warmup.start_lr, warmup.source) == (2000, 20.0, 0.0, MA_YARATS)


def test_adam_with_linear_scaling_takes_the_longer_of_both_warmups() -> None:
    rate = scale_learning_rate(1e-4, 256, 4096, "linear", "adam")
    long_epochs = _warmup("adam", rate, Schedule.of(4_000_000, 10, 4096))  # 5 epochs = 5 x 977 steps > 2000
    short_epochs = _warmup("adam", rate, Schedule.of(100_000, 10, 4096))  # 5 x 25 steps < 2000
    assert long_epochs is not None and short_epochs is not None
    assert (long_epochs.steps, short_epochs.steps) == (5 * 977, 2000)
    assert GOYAL in long_epochs.source and MA_YARATS in long_epochs.source
    unknown = _warmup("adam", rate)
    assert unknown is not None and (unknown.steps, unknown.epochs) == (None, 5)


def test_sgd_needs_no_warmup_when_the_rate_does_not_grow_and_none_is_made_up_without_a_recipe() -> None:
    same = _warmup("sgd", scale_learning_rate(0.1, 256, 256, "auto", "sgd"))
    assert same is not None and same.steps == 0
    assert _warmup("sgd", None) is None


def test_given_warmups_are_turned_into_steps() -> None:
    schedule = Schedule.of(10_000, 10, 100)  # 100 steps per epoch, 1000 in all
    assert _warmup("sgd", None, schedule, warmup_steps=250).epochs == 2.5  # type: ignore[union-attr]
    assert _warmup("sgd", None, schedule, warmup_epochs=1.5).steps == 150  # type: ignore[union-attr]
    assert _warmup("sgd", None, schedule, warmup_ratio=0.06).steps == 60  # type: ignore[union-attr]
    epochs_only = _warmup("sgd", None, None, warmup_epochs=2.0)
    assert epochs_only is not None and (epochs_only.steps, epochs_only.epochs) == (None, 2.0)


def test_a_warmup_ratio_needs_the_total_steps() -> None:
    with pytest.raises(BadInput, match="--dataset-size and --epochs"):
        _warmup("sgd", None, Schedule.of(10_000, None, 100), warmup_ratio=0.1)


def test_steps_count_a_last_partial_batch() -> None:
    assert Schedule.of(1000, 3, 300) == Schedule(1000, 3, 4, 12)
    assert Schedule.of(1000, 2.5, 300).total_steps == 10
