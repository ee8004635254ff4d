"""`bsplan plan` as a user runs it: fresh processes, machine-readable outputs, errors, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import bsplan
from no_torch import run_without_torch
from plan_helpers import probe_data, save_probe

ISSUE_EXAMPLE = ("plan", "--target", "1024", "--gpus", "4", "--max-micro", "48")
GOYAL = ("plan", "--target", "8192", "--gpus", "8", "--nodes", "4", "--max-micro", "64", "--optimizer", "sgd",
         "--base-lr", "0.1", "--base-batch", "256", "--dataset-size", "1281167", "--epochs", "90")


@pytest.mark.parametrize("args", [ISSUE_EXAMPLE, ("plan", "--target", "1024", "--gpus", "4", "--format", "deepspeed")])
def test_plan_never_imports_torch(tmp_path: Path, args: tuple[str, ...]) -> None:
    save_probe(tmp_path, probe_data())  # the second run reads it
    run_without_torch(*args, cwd=tmp_path)


def test_the_issue_example_gives_32_x_8_x_4(workdir: Path) -> None:
    run = bsplan(*ISSUE_EXAMPLE, "--json", cwd=workdir)
    assert run.code == 0, run.stderr
    data = run.json()
    assert (data["micro_batch"], data["accumulation_steps"], data["world_size"]) == (32, 8, 4)


def test_the_table_shows_the_split_the_warnings_and_where_the_limit_came_from(workdir: Path) -> None:
    save_probe(workdir, probe_data(has_batchnorm=True, recommended=16))
    run = bsplan("plan", "--target", "1024", "--gpus", "4", cwd=workdir, env={"COLUMNS": "200"})
    assert run.code == 0, run.stderr
    assert "global batch 1024 = 16 x 16 x 4 devices" in run.stdout
    assert "recommended_batch of the probe of models/cnn.py on cuda:0 (NVIDIA H100 80GB HBM3) in .bsplan/last-probe.json" in run.stdout
    assert "SyncBatchNorm" in run.stdout and "whole global batch" in run.stdout


def test_with_no_probe_and_no_limit_it_says_so_plainly(workdir: Path) -> None:
    run = bsplan("plan", "--target", "1024", "--gpus", "4", cwd=workdir, env={"COLUMNS": "200"})
    assert run.code == 0, run.stderr
    assert "256 x 1 x 4 devices" in run.stdout and "no per-device limit was known" in run.stdout


def test_the_json_is_the_plan_with_its_rate_and_schedule(workdir: Path) -> None:
    data = bsplan(*GOYAL, "--json", cwd=workdir).json()
    assert data["schema"] == "bsplan.plan/1"
    assert (data["learning_rate"], data["warmup_steps"], data["steps_per_epoch"], data["total_steps"]) == (3.2, 785, 157, 14130)


@pytest.mark.parametrize(("fmt", "check"), [
    ("json", lambda out: json.loads(out)["micro_batch"] == 64),
    ("deepspeed", lambda out: json.loads(out)["gradient_accumulation_steps"] == 4),
    ("hf", lambda out: json.loads(out)["per_device_train_batch_size"] == 64),
    ("lightning", lambda out: out.splitlines() == ["trainer:", "  accumulate_grad_batches: 4", "  devices: 8", "  num_nodes: 4"]),
    ("torchrun", lambda out: out.split() == ["--nnodes=4", "--nproc_per_node=8"]),
])
def test_each_format_prints_only_what_its_tool_reads(workdir: Path, fmt: str, check: object) -> None:
    run = bsplan(*GOYAL, "--format", fmt, cwd=workdir)
    assert run.code == 0, run.stderr
    assert check(run.stdout)  # type: ignore[operator]


def test_a_target_that_does_not_split_fails_in_one_sentence_naming_the_nearest(workdir: Path) -> None:
    run = bsplan("plan", "--target", "1000", "--gpus", "3", "--max-micro", "64", cwd=workdir, env={"COLUMNS": "400"})
    assert run.code == 2 and run.stdout == ""
    assert run.stderr.startswith("error: cannot split global batch 1000 exactly") and run.stderr.count("\n") == 1
    assert "999 (micro-batch 37 x 9 accumulation steps) and 1002" in run.stderr


def test_with_json_an_error_is_a_json_object(workdir: Path) -> None:
    run = bsplan("plan", "--target", "1000", "--gpus", "3", "--max-micro", "64", "--json", cwd=workdir)
    assert run.code == 2
    assert run.json()["kind"] == "BadInput" and "1002" in run.json()["error"]


@pytest.mark.parametrize(("args", "match"), [
    (("--base-lr", "0.1"), "--base-lr and --base-batch go together"),
    (("--json", "--format", "hf"), "ask for two outputs"),
    (("--from", "missing.json"), "no saved probe at missing.json"),
    (("--scaling", "cubic"), "cubic"),
])
def test_bad_input_exits_2(workdir: Path, args: tuple[str, ...], match: str) -> None:
    run = bsplan("plan", "--target", "1024", *args, cwd=workdir, env={"COLUMNS": "400"})
    assert run.code == 2
    assert match in run.stderr + run.stdout


def test_every_format_the_cli_offers_exports_a_plan(workdir: Path) -> None:
    from bsplan.planning.choices import ExportFormat, PlanFormat

    assert PlanFormat.values() == ("table", "json", *ExportFormat.values())
    for fmt in ExportFormat.values():
        run = bsplan("plan", "--target", "64", "--max-micro", "16", "--format", fmt, cwd=workdir)
        assert run.code == 0 and run.stdout.strip(), (fmt, run.stderr)
