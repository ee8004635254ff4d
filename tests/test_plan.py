"""The split of a global batch, where its limit comes from, and the warnings, without the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from plan_helpers import probe_data, save_probe

from bsplan.planning.decomposition import decompose, nearest_achievable
from bsplan.planning.errors import BadInput
from bsplan.planning.plan import PlanOptions
from bsplan.planning.planner import make_plan
from bsplan.planning.results import SAME_THROUGHPUT


def _valid(micro: int, global_batch: int, world: int, limit: int | None, multiple_of: int) -> bool:
    """The definition, by brute force: an exact split within the limit (no limit: accumulation 1)."""
    if micro % multiple_of or global_batch % (world * micro):
        return False
    return micro <= limit if limit is not None else micro * world == global_batch


sizes = dict(
    global_batch=st.integers(1, 3000), world=st.integers(1, 12),
    limit=st.one_of(st.none(), st.integers(1, 200)), multiple_of=st.integers(1, 6),
)


@given(**sizes)
def test_the_choice_is_exact_within_the_limit_with_the_fewest_accumulation_steps(
    global_batch: int, world: int, limit: int | None, multiple_of: int
) -> None:
    assume(limit is None or limit >= multiple_of)
    valid = [m for m in range(1, global_batch + 1) if _valid(m, global_batch, world, limit, multiple_of)]
    if not valid:
        with pytest.raises(BadInput, match="nearest achievable"):
            decompose(global_batch, world, limit, multiple_of)
        return
    result = decompose(global_batch, world, limit, multiple_of)
    choice = result.choice
    assert choice.micro_batch * choice.accumulation_steps * world == global_batch
    assert limit is None or choice.micro_batch <= limit
    assert choice.micro_batch % multiple_of == 0
    assert choice.micro_batch == max(valid)  # the fewest accumulation steps
    for other in result.alternatives:
        assert _valid(other.micro_batch, global_batch, world, limit, multiple_of)
        assert other.accumulation_steps > choice.accumulation_steps


@given(global_batch=st.integers(1, 3000), world=st.integers(1, 12), multiple_of=st.integers(1, 6), limit=st.integers(6, 200))
def test_the_nearest_achievable_batches_split_and_nothing_between_them_does(
    global_batch: int, world: int, multiple_of: int, limit: int
) -> None:
    below, above = nearest_achievable(global_batch, world, multiple_of)
    for target in (below, above):
        if target is not None:
            decompose(target, world, limit, multiple_of)  # does not raise
    lowest = 1 if below is None else below + 1
    between = [g for g in range(lowest, above) if any(_valid(m, g, world, limit, multiple_of) for m in range(1, limit + 1))]
    assert between in ([], [global_batch])


@given(
    global_batch=st.integers(1, 2000), world=st.integers(1, 8), limit=st.integers(1, 128),
    rates=st.dictionaries(st.integers(1, 128), st.floats(1.0, 1e4), min_size=1, max_size=8),
)
def test_with_timings_the_choice_is_within_the_tie_margin_of_the_fastest(
    global_batch: int, world: int, limit: int, rates: dict[int, float]
) -> None:
    assume(global_batch % world == 0)
    result = decompose(global_batch, world, limit, throughput=sorted(rates.items()))
    splits = [result.choice, *result.alternatives]
    assert all(s.micro_batch * s.accumulation_steps * world == global_batch for s in splits)
    timed = [s.seconds_per_step for s in splits if s.seconds_per_step is not None]
    if timed:  # else every micro-batch lies below the probed ones, and the fewest accumulation steps win
        assert result.choice.seconds_per_step is not None
        assert result.choice.seconds_per_step <= min(timed) * SAME_THROUGHPUT


def test_the_issue_example_splits_1024_over_4_gpus_as_32_x_8() -> None:
    plan = make_plan(PlanOptions(1024, gpus_per_node=4, max_micro=48))
    assert (plan.micro_batch, plan.accumulation_steps, plan.world_size) == (32, 8, 4)
    assert [(s.micro_batch, s.accumulation_steps) for s in plan.alternatives] == [(16, 16), (8, 32), (4, 64), (2, 128)]
    assert plan.chosen_by == "fewest accumulation steps"


def test_1000_over_3_gpus_names_999_and_1002() -> None:
    with pytest.raises(BadInput) as error:
        make_plan(PlanOptions(1000, gpus_per_node=3, max_micro=64))
    message = str(error.value)
    assert "999 (micro-batch 37 x 9 accumulation steps)" in message and "1002 (" in message
    assert "\n" not in message and message.count(";") == 1


def test_multiple_of_that_does_not_divide_names_the_nearest_multiples() -> None:
    with pytest.raises(BadInput, match=r"not a multiple of --multiple-of 3.* 1020 .* 1032 "):
        make_plan(PlanOptions(1024, gpus_per_node=4, max_micro=48, multiple_of=3))


def test_a_target_below_one_sample_per_device_names_only_the_batch_above(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"nearest achievable global batch is 8 \(micro-batch 1 x 1 accumulation step\)$"):
        make_plan(PlanOptions(5, gpus_per_node=8), cwd=tmp_path)  # no saved probe there to take a limit from


def test_a_multiple_of_above_the_limit_is_refused() -> None:
    with pytest.raises(BadInput, match="above the per-device limit of 2"):
        make_plan(PlanOptions(1024, gpus_per_node=4, max_micro=2, multiple_of=4))


def test_nodes_multiply_the_world_size() -> None:
    plan = make_plan(PlanOptions(4096, gpus_per_node=8, nodes=4, max_micro=64))
    assert (plan.world_size, plan.micro_batch, plan.accumulation_steps) == (32, 64, 2)


def test_with_no_limit_known_it_plans_accumulation_1_and_says_how_to_give_one(tmp_path: Path) -> None:
    plan = make_plan(PlanOptions(1024, gpus_per_node=4), cwd=tmp_path)
    assert (plan.micro_batch, plan.accumulation_steps, plan.alternatives) == (256, 1, ())
    warning = next(w for w in plan.warnings if w.code == "no-limit")
    assert "no per-device limit was known" in warning.reason and "--max-micro" in warning.message


def test_the_probe_saved_here_gives_its_recommended_batch(tmp_path: Path) -> None:
    save_probe(tmp_path, probe_data())
    plan = make_plan(PlanOptions(1024, gpus_per_node=4), cwd=tmp_path)
    assert plan.limit.micro_batch == 45 and plan.limit.source == "recommended_batch"
    assert plan.to_dict()["limit"]["probe"] == {
        "file": str(tmp_path / ".bsplan" / "last-probe.json"), "model": "models/cnn.py", "device": "cuda:0 (NVIDIA H100 80GB HBM3)",
    }


def test_use_max_takes_the_probes_max_batch(tmp_path: Path) -> None:
    save_probe(tmp_path, probe_data())
    assert make_plan(PlanOptions(1024, gpus_per_node=4, use="max"), cwd=tmp_path).limit.micro_batch == 52


def test_max_micro_wins_and_a_saved_probe_is_then_not_read(tmp_path: Path) -> None:
    save_probe(tmp_path, probe_data(has_batchnorm=True))
    plan = make_plan(PlanOptions(1024, gpus_per_node=4, max_micro=8), cwd=tmp_path)
    assert plan.limit.source == "--max-micro" and plan.limit.probe is None
    assert not any(w.code == "batchnorm-small-micro" for w in plan.warnings)


def test_a_max_micro_above_what_the_named_probe_fitted_is_warned(tmp_path: Path) -> None:
    path = save_probe(tmp_path, probe_data(timings={}), Path("probe.json"))
    plan = make_plan(PlanOptions(1024, gpus_per_node=4, max_micro=64, probe_file=path))
    assert plan.micro_batch == 64 and any(w.code == "above-probed-max" for w in plan.warnings)


def test_from_names_a_probe_whose_timings_choose_the_split(tmp_path: Path) -> None:
    path = save_probe(tmp_path, probe_data(), Path("runs/probe.json"))
    plan = make_plan(PlanOptions(1024, gpus_per_node=4, probe_file=path, use="max"), cwd=tmp_path)
    # 256 per device: 32 runs 800 samples/s, faster than 52's 690 samples/s and than nothing else larger that divides.
    assert (plan.micro_batch, plan.accumulation_steps) == (32, 8)
    assert plan.choice.timing == "measured"
    assert plan.choice.seconds_per_step == pytest.approx(256 / 800)
    assert plan.chosen_by.startswith("fastest predicted optimizer step")


def test_timings_pick_a_smaller_micro_batch_when_it_is_clearly_faster() -> None:
    result = decompose(1024, 4, 64, throughput=[(16, 1000.0), (64, 500.0)])
    assert (result.choice.micro_batch, result.choice.timing) == (16, "measured")
    interpolated = next(s for s in result.alternatives if s.micro_batch == 32)
    # seconds per sample from 1/1000 at 16 to 1/500 at 64: a third of the way at 32.
    assert interpolated.timing == "interpolated"
    assert interpolated.seconds_per_step == pytest.approx(256 * (0.001 + (0.002 - 0.001) / 3))


def test_a_batchnorm_model_probed_fastest_at_small_batches_gets_32_per_device_and_no_warning(tmp_path: Path) -> None:
    save_probe(tmp_path, probe_data(has_batchnorm=True, timings={8: 1000.0, 16: 900.0, 32: 600.0, 52: 500.0}))
    plan = make_plan(PlanOptions(1024, gpus_per_node=4, use="max"), cwd=tmp_path)
    assert (plan.micro_batch, plan.accumulation_steps) == (32, 8)
    assert not any(w.code == "batchnorm-small-micro" for w in plan.warnings)
    without = make_plan(PlanOptions(1024, gpus_per_node=4, use="max", batchnorm=False), cwd=tmp_path)
    assert without.micro_batch == 8


def test_with_batchnorm_timings_choose_among_micro_batches_of_32_and_up() -> None:
    rates = [(8, 1000.0), (16, 900.0), (32, 600.0), (64, 500.0)]  # CPU-like: small batches fastest per sample
    assert decompose(1024, 4, 64, throughput=rates).choice.micro_batch == 8
    chosen = decompose(1024, 4, 64, throughput=rates, min_micro=32)
    assert chosen.choice.micro_batch == 32 and "BatchNorm" in chosen.chosen_by
    assert chosen.alternatives[0].micro_batch == 8  # the faster split is still shown
    # Nothing of 32 or more is timed (or fits): the timings choose among what there is.
    assert decompose(1024, 4, 16, throughput=rates, min_micro=32).choice.micro_batch == 8


def test_timings_within_the_tie_margin_go_to_fewer_accumulation_steps() -> None:
    result = decompose(1024, 4, 64, throughput=[(32, 1000.0), (64, 980.0)])
    assert result.choice.micro_batch == 64


def test_micro_batches_past_the_probed_ones_are_timed_flat_and_those_below_not_at_all() -> None:
    result = decompose(1024, 4, 256, throughput=[(8, 100.0), (16, 200.0)])
    assert (result.choice.micro_batch, result.choice.timing) == (256, "extrapolated")
    below = decompose(1024, 4, 16, throughput=[(8, 100.0), (16, 200.0)])
    assert [(s.micro_batch, s.timing) for s in below.alternatives] == [(8, "measured"), (4, None), (2, None), (1, None)]
    assert decompose(1024, 4, 4, throughput=[(8, 100.0)]).chosen_by == "fewest accumulation steps"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("{not json", "is not JSON"),
        (json.dumps({"schema": "bsplan.plan/1"}), "is not a bsplan.probe/1 probe result"),
        (json.dumps({"schema": "bsplan.probe/1", "model": {}}), "is a damaged probe result"),
    ],
)
def test_a_file_that_is_not_a_probe_is_refused(tmp_path: Path, data: str, match: str) -> None:
    path = tmp_path / "probe.json"
    path.write_text(data)
    with pytest.raises(BadInput, match=match):
        make_plan(PlanOptions(1024, gpus_per_node=4, probe_file=path))


def test_a_missing_probe_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no saved probe at"):
        make_plan(PlanOptions(1024, gpus_per_node=4, probe_file=tmp_path / "nothing.json"))


def test_a_probe_where_nothing_fitted_gives_no_limit(tmp_path: Path) -> None:
    save_probe(tmp_path, probe_data(max_batch=None, recommended=None, timings={}))
    with pytest.raises(BadInput, match="found no batch that fits"):
        make_plan(PlanOptions(1024, gpus_per_node=4), cwd=tmp_path)


def test_a_probe_without_a_recommended_batch_falls_back_to_its_max(tmp_path: Path) -> None:
    save_probe(tmp_path, probe_data(recommended=None))
    plan = make_plan(PlanOptions(1024, gpus_per_node=4), cwd=tmp_path)
    assert plan.limit.source == "max_batch" and any("no recommended_batch" in note for note in plan.notes)


def test_what_to_know_about_the_probe_is_said(tmp_path: Path) -> None:
    save_probe(tmp_path, probe_data(device_type="cpu", mode="infer", capped_at=52, interrupted=True))
    plan = make_plan(PlanOptions(1024, gpus_per_node=4), cwd=tmp_path)
    assert {"probe-not-training", "probe-interrupted"} <= {w.code for w in plan.warnings}
    assert any("ran on the CPU" in note for note in plan.notes)
    assert any("true limit may be higher" in note for note in plan.notes)


def test_batchnorm_from_the_probe_below_32_per_device_suggests_syncbatchnorm(tmp_path: Path) -> None:
    save_probe(tmp_path, probe_data(has_batchnorm=True, recommended=16))
    plan = make_plan(PlanOptions(1024, gpus_per_node=4), cwd=tmp_path)
    warning = next(w for w in plan.warnings if w.code == "batchnorm-small-micro")
    assert "SyncBatchNorm" in warning.message and "found by the probe of models/cnn.py" in warning.reason
    assert "arXiv:1803.08494" in (warning.source or "")


def test_batchnorm_where_even_all_devices_see_few_samples_suggests_groupnorm() -> None:
    plan = make_plan(PlanOptions(64, gpus_per_node=2, max_micro=4, batchnorm=True))
    warning = next(w for w in plan.warnings if w.code == "batchnorm-small-micro")
    assert warning.message.startswith("use GroupNorm") and "(--batchnorm)" in warning.reason


def test_no_batchnorm_warning_at_32_per_device_or_without_batchnorm() -> None:
    codes = {w.code for w in make_plan(PlanOptions(1024, gpus_per_node=4, max_micro=32, batchnorm=True)).warnings}
    assert "batchnorm-small-micro" not in codes
    codes = {w.code for w in make_plan(PlanOptions(1024, gpus_per_node=4, max_micro=8)).warnings}
    assert "batchnorm-small-micro" not in codes


def test_sgd_beyond_8k_suggests_lars_or_lamb() -> None:
    warnings = make_plan(PlanOptions(16384, gpus_per_node=8, nodes=8, max_micro=256, optimizer="sgd")).warnings
    warning = next(w for w in warnings if w.code == "large-batch-sgd")
    assert "LARS" in warning.message and "arXiv:1706.02677" in (warning.source or "")
    assert not any(w.code == "large-batch-sgd" for w in make_plan(PlanOptions(8192, gpus_per_node=8, max_micro=1024, optimizer="sgd")).warnings)


def test_accumulation_warns_about_normalising_the_loss_over_the_global_batch() -> None:
    plan = make_plan(PlanOptions(1024, gpus_per_node=4, max_micro=48))
    warning = next(w for w in plan.warnings if w.code == "accumulation-loss")
    assert "whole global batch" in warning.message and "Remark 3" in (warning.source or "")
    assert not any(w.code == "accumulation-loss" for w in make_plan(PlanOptions(1024, gpus_per_node=4, max_micro=256)).warnings)


def test_a_short_adam_warmup_and_a_warmup_longer_than_training_are_warned() -> None:
    plan = make_plan(PlanOptions(1024, max_micro=1024, warmup_steps=100, dataset_size=10_000, epochs=2))
    codes = {w.code for w in plan.warnings}
    assert {"short-adam-warmup", "warmup-longer-than-training"} <= codes  # 100 < 2000; 100 > 2 x 10 steps


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(global_batch=0), "--target must be a whole number of at least 1"),
        (dict(global_batch=8, gpus_per_node=0), "--gpus"),
        (dict(global_batch=8, nodes=0), "--nodes"),
        (dict(global_batch=8, max_micro=0), "--max-micro"),
        (dict(global_batch=8, multiple_of=0), "--multiple-of"),
        (dict(global_batch=8, dataset_size=0), "--dataset-size"),
        (dict(global_batch=8, base_lr=0.0, base_batch=8), "--base-lr must be a finite number more than 0"),
        (dict(global_batch=8, base_lr=0.1), "--base-lr and --base-batch go together"),
        (dict(global_batch=8, base_batch=256), "--base-lr and --base-batch go together"),
        (dict(global_batch=8, optimizer="rmsprop"), "unknown --optimizer"),
        (dict(global_batch=8, beta2=1.0), "--beta2 must lie between 0 and 1"),
        (dict(global_batch=8, warmup_steps=10, warmup_epochs=1.0), "give one of --warmup-steps"),
        (dict(global_batch=8, warmup_steps=-1), "cannot be negative"),
        (dict(global_batch=8, warmup_ratio=1.5), "below 1"),
        (dict(global_batch=8, epochs=3.0), "--epochs needs --dataset-size"),
        (dict(global_batch=8, epochs=0.0, dataset_size=10), "--epochs must be a finite number more than 0"),
    ],
)
def test_bad_options_are_refused_in_one_sentence(options: dict[str, object], match: str) -> None:
    with pytest.raises(BadInput, match=match):
        PlanOptions(**options)  # type: ignore[arg-type]


def test_warmup_ratio_without_a_schedule_is_refused() -> None:
    with pytest.raises(BadInput, match="--warmup-ratio is a fraction of the total steps"):
        make_plan(PlanOptions(8, max_micro=8, warmup_ratio=0.1))


def test_the_json_has_the_stable_field_names() -> None:
    data = make_plan(PlanOptions(8192, gpus_per_node=8, max_micro=256, base_lr=0.1, base_batch=256, optimizer="sgd",
                                 dataset_size=1_281_167, epochs=90)).to_dict()
    for name in ("micro_batch", "accumulation_steps", "world_size", "nodes", "gpus_per_node", "global_batch", "learning_rate",
                 "warmup_steps", "steps_per_epoch", "total_steps", "alternatives", "warnings", "schema"):
        assert name in data
    assert data["schema"] == "bsplan.plan/1"
    assert (data["learning_rate"], data["warmup_steps"], data["steps_per_epoch"], data["total_steps"]) == (3.2, 785, 157, 14130)
    assert json.loads(json.dumps(data)) == data
