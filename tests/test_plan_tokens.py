"""Planning in tokens: --target-tokens, --seq-len (and a saved sweep over lengths), --dataset-tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import bsplan
from no_torch import run_without_torch
from plan_helpers import probe_data, save_probe

from bsplan.planning.errors import BadInput
from bsplan.planning.plan import PlanOptions
from bsplan.planning.planner import make_plan
from bsplan.planning.units import parse_tokens


@pytest.mark.parametrize(("text", "count"), [
    ("4M", 4_000_000), ("4Mi", 4_194_304), ("4m", 4_000_000), ("4k", 4000), ("4K", 4000), ("4Ki", 4096),
    ("2G", 2_000_000_000), ("2Gi", 2**31), ("15T", 15 * 10**12), ("1.5M", 1_500_000), ("4096", 4096), (" 4 Mi ", 4_194_304),
])
def test_token_counts_read_si_and_binary_suffixes(text: str, count: int) -> None:
    assert parse_tokens(text, "--target-tokens") == count


@pytest.mark.parametrize(("text", "match"), [
    ("4MB", "cannot read --target-tokens '4MB' as a count of tokens"), ("4MiB", "cannot read"), ("4e6", "cannot read"),
    ("-4M", "cannot read"), ("four", "cannot read"), ("4,000", "cannot read"), ("", "cannot read"), ("M", "cannot read"),
    ("1.5", "not a whole number"), ("0", "at least 1 token"),
])
def test_bad_token_counts_are_refused_in_one_sentence(text: str, match: str) -> None:
    with pytest.raises(BadInput, match=match):
        parse_tokens(text, "--target-tokens")


def _options(**given: Any) -> PlanOptions:
    return PlanOptions.from_cli(**{"target": None, **given})


def test_target_tokens_that_divide_give_the_exact_samples() -> None:
    plan = make_plan(_options(target_tokens="4Mi", seq_len=4096, gpus_per_node=8, max_micro=16))
    assert (plan.global_batch, plan.micro_batch, plan.accumulation_steps) == (1024, 16, 8)
    data = plan.to_dict()
    assert (data["seq_len"], data["target_tokens"], data["tokens_per_step"]) == (4096, 4_194_304, 4_194_304)
    assert "in tokens: 1024 samples x 4096 = 4,194,304 tokens per optimizer step" in plan.notes


def test_target_tokens_that_do_not_divide_round_down_to_whole_samples_and_say_the_tokens() -> None:
    plan = make_plan(_options(target_tokens="4M", seq_len=4096, gpus_per_node=8, max_micro=16))
    assert plan.global_batch == 976 and plan.tokens_per_step == 976 * 4096  # 4,000,000 / 4096 = 976.56
    assert plan.to_dict()["target_tokens"] == 4_000_000
    assert any("takes 976 samples, exactly 3,997,696 tokens per optimizer step" in note for note in plan.notes)


def test_fewer_tokens_than_one_sample_plan_one_sample() -> None:
    assert make_plan(_options(target_tokens="1K", seq_len=4096, max_micro=4)).global_batch == 1


def test_a_plan_in_samples_keeps_its_fields_and_has_no_tokens() -> None:
    data = make_plan(PlanOptions(1024, gpus_per_node=4, max_micro=48)).to_dict()
    assert (data["seq_len"], data["target_tokens"], data["tokens_per_step"]) == (None, None, None)
    assert data["global_batch"] == 1024 and not any("tokens" in note for note in data["notes"])


def test_a_token_target_takes_the_whole_samples_that_split_over_the_devices() -> None:
    plan = make_plan(_options(target_tokens="4M", seq_len=4096, gpus_per_node=3, max_micro=16))
    assert plan.global_batch == 975 and plan.micro_batch * plan.accumulation_steps * 3 == 975  # 976.56 down to 3 x 325
    assert any("takes 975 samples, exactly 3,993,600 tokens per optimizer step" in note for note in plan.notes)
    assert make_plan(_options(target_tokens="1K", seq_len=4096, gpus_per_node=4, max_micro=4)).global_batch == 4


@pytest.mark.parametrize(("given", "match"), [
    (dict(), "give the global batch once: --target in samples, or --target-tokens"),
    (dict(target=1024, target_tokens="4M", seq_len=4096), "give the global batch once"),
    (dict(target_tokens="4M"), "--target-tokens needs --seq-len"),
    (dict(target=64, dataset_tokens="1G"), "--dataset-tokens needs --seq-len"),
    (dict(target=64, seq_len=512, dataset_tokens="1G", dataset_size=1000), "give the dataset once"),
    (dict(target_tokens="4M", seq_len=0), "--seq-len must be a whole number of at least 1"),
    (dict(target_tokens="4 MB", seq_len=512), "cannot read --target-tokens '4 MB'"),
    (dict(target=64, seq_len=512, dataset_tokens="lots"), "cannot read --dataset-tokens 'lots'"),
])
def test_bad_token_options_are_refused_in_one_sentence(given: dict[str, Any], match: str) -> None:
    with pytest.raises(BadInput, match=match):
        _options(**given)


def test_dataset_tokens_count_the_steps_per_epoch() -> None:
    # 1,000,000,000 tokens / 2048 = 488,281.25 samples: 488,282 with the last one partial; 256 samples per step.
    plan = make_plan(_options(target=256, seq_len=2048, dataset_tokens="1G", epochs=2.0, max_micro=64))
    assert plan.schedule is not None and plan.schedule.dataset_size == 488_282
    assert (plan.schedule.steps_per_epoch, plan.schedule.total_steps) == (1908, 3816)  # ceil(1e9 / (256 x 2048)) = 1908
    assert any("are 488,282 samples of 2048 tokens (the last one partial)" in note for note in plan.notes)
    exact = make_plan(_options(target_tokens="1Mi", seq_len=1024, dataset_tokens="1Gi", max_micro=1024))
    assert exact.schedule is not None and exact.schedule.steps_per_epoch == 1024  # 2**30 / 2**20


# A sweep as `bsplan probe --seq-len 512,2048` saves it: the same model, a probe document at each length.
LENGTHS = {512: (64, 56), 2048: (16, 12)}  # seq_len: (max_batch, recommended_batch)


def _sweep() -> dict[str, Any]:
    rows = []
    for length, (most, recommended) in LENGTHS.items():
        result = {**probe_data(max_batch=most, recommended=recommended, timings={1: 10.0, 2: 20.0}), "seq_len": length}
        rows.append({"seq_len": length, "max_batch": most, "max_tokens": most * length, "recommended_batch": recommended,
                     "peak_bytes": None, "tokens_per_second": None, "result": result})
    return {"schema": "bsplan.sweep/1", "command": "probe", "model": rows[0]["result"]["model"], "sweep": rows,
            "token_budget": None}


@pytest.fixture
def sweep_file(tmp_path: Path) -> Path:
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(_sweep()))
    return path


@pytest.mark.parametrize(("length", "micro"), [(512, 32), (2048, 8)])
def test_a_sweep_gives_the_limit_at_the_plans_seq_len(sweep_file: Path, length: int, micro: int) -> None:
    plan = make_plan(_options(target=256, seq_len=length, gpus_per_node=4, probe_file=sweep_file))
    assert plan.limit.micro_batch == LENGTHS[length][1] and plan.limit.probe is not None
    assert (plan.micro_batch, plan.accumulation_steps) == (micro, 64 // micro)  # 256 / 4 = 64 per device
    assert f"at sequence length {length} in {sweep_file}" in plan.limit.probe.describe()


@pytest.mark.parametrize(("length", "match"), [
    (None, "is a sweep over sequence lengths 512, 2048: give --seq-len with one of them"),
    (1024, "has no result at --seq-len 1024: its sequence lengths are 512, 2048"),
])
def test_a_sweep_without_the_plans_seq_len_is_refused_naming_its_lengths(sweep_file: Path, length: int | None, match: str) -> None:
    with pytest.raises(BadInput, match=match):
        make_plan(_options(target=256, seq_len=length, gpus_per_node=4, probe_file=sweep_file))


def test_a_sweep_saved_here_is_read_like_a_probe(tmp_path: Path) -> None:
    save_probe(tmp_path, _sweep())
    plan = make_plan(_options(target_tokens="512Ki", seq_len=2048, gpus_per_node=4), cwd=tmp_path)
    assert (plan.global_batch, plan.limit.micro_batch, plan.micro_batch, plan.accumulation_steps) == (256, 12, 8, 8)


def test_a_sweep_row_without_a_result_is_refused(tmp_path: Path) -> None:
    data = _sweep()
    data["sweep"][1]["result"] = None
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BadInput, match="holds no bsplan.probe/1 probe result or bsplan.estimate/1 estimate at sequence length 2048"):
        make_plan(_options(target=256, seq_len=2048, probe_file=path))


def test_a_probe_at_one_length_refuses_a_plan_at_another(tmp_path: Path) -> None:
    path = save_probe(tmp_path, {**probe_data(), "seq_len": 1024}, Path("probe.json"))
    with pytest.raises(BadInput, match=r"was measured at sequence length 1024, not --seq-len 2048.*--seq-len 1024,2048"):
        make_plan(_options(target=256, seq_len=2048, probe_file=path))
    assert make_plan(_options(target=256, seq_len=1024, probe_file=path)).limit.micro_batch == 45


def test_a_probe_without_a_length_is_taken_at_the_plans_and_says_so(tmp_path: Path) -> None:
    save_probe(tmp_path, probe_data())
    plan = make_plan(_options(target=256, seq_len=2048), cwd=tmp_path)
    assert plan.limit.micro_batch == 45
    assert "the probe records no sequence length: its limit is taken to hold at --seq-len 2048" in plan.notes


# --- the command line -------------------------------------------------------------------------


def test_the_cli_plans_in_tokens_from_a_sweep(workdir: Path, sweep_file: Path) -> None:
    run = bsplan("plan", "--target-tokens", "4Mi", "--seq-len", "2048", "--gpus", "8", "--from", str(sweep_file),
                 "--dataset-tokens", "2Gi", "--json", cwd=workdir)
    assert run.code == 0, run.stderr
    data = run.json()
    assert (data["global_batch"], data["micro_batch"], data["accumulation_steps"], data["world_size"]) == (2048, 8, 32, 8)
    assert (data["seq_len"], data["target_tokens"], data["tokens_per_step"], data["steps_per_epoch"]) == (2048, 2**22, 2**22, 512)
    assert data["limit"]["source"] == "recommended_batch" and data["schema"] == "bsplan.plan/1"


def test_the_cli_table_says_the_tokens_per_step(workdir: Path) -> None:
    run = bsplan("plan", "--target-tokens", "4M", "--seq-len", "4096", "--gpus", "8", "--max-micro", "16", cwd=workdir,
                 env={"COLUMNS": "300"})
    assert run.code == 0, run.stderr
    assert "global batch 976 = 2 x 61 x 8 devices" in run.stdout
    assert "the plan takes 976 samples, exactly 3,997,696 tokens per optimizer step" in run.stdout


@pytest.mark.parametrize(("args", "match"), [
    ((), "give the global batch once"),
    (("--target", "64", "--target-tokens", "4M", "--seq-len", "8"), "give the global batch once"),
    (("--target-tokens", "4M"), "--target-tokens needs --seq-len"),
    (("--target-tokens", "4MB", "--seq-len", "8"), "cannot read --target-tokens '4MB' as a count of tokens"),
    (("--target", "64", "--seq-len", "8", "--dataset-size", "10", "--dataset-tokens", "1M"), "give the dataset once"),
])
def test_bad_token_options_exit_2_in_one_sentence(workdir: Path, args: tuple[str, ...], match: str) -> None:
    run = bsplan("plan", *args, cwd=workdir, env={"COLUMNS": "400"})
    assert run.code == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and match in run.stderr and run.stderr.count("\n") == 1


def test_the_cli_refuses_a_sweep_without_seq_len_as_json(workdir: Path, sweep_file: Path) -> None:
    run = bsplan("plan", "--target", "256", "--from", str(sweep_file), "--json", cwd=workdir)
    assert run.code == 2
    assert run.json()["kind"] == "BadInput" and "sequence lengths 512, 2048" in run.json()["error"]


def test_help_names_the_token_options_and_their_units(workdir: Path) -> None:
    run = bsplan("plan", "--help", cwd=workdir, env={"COLUMNS": "200"})
    assert run.code == 0
    assert all(option in run.stdout for option in ("--target-tokens", "--seq-len", "--dataset-tokens", "4Mi = 4,194,304"))


def test_planning_in_tokens_from_a_sweep_never_imports_torch(tmp_path: Path) -> None:
    save_probe(tmp_path, _sweep())
    out = run_without_torch("plan", "--target-tokens", "1Mi", "--seq-len", "512", "--gpus", "4", "--json", cwd=tmp_path)
    assert json.loads(out)["tokens_per_step"] == 2**20
