"""Each export parsed back the way its tool reads it, and checked against the plan."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
from plan_helpers import probe_data, save_probe

from bsplan.planning.export import export_plan
from bsplan.planning.plan import Plan, PlanOptions
from bsplan.planning.planner import make_plan

# TrainingArguments fields the HF export may set (transformers' training_args.py).
HF_FIELDS = {"per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "warmup_steps"}


def _plan(**options: object) -> Plan:
    values: dict[str, object] = dict(
        global_batch=8192, gpus_per_node=8, nodes=4, max_micro=64, base_lr=0.1, base_batch=256, optimizer="sgd",
        dataset_size=1_281_167, epochs=90,
    )
    return make_plan(PlanOptions(**{**values, **options}))  # type: ignore[arg-type]


def _read_yaml_mapping(text: str) -> dict[str, dict[str, int]]:
    """The YAML subset the Lightning export writes (a mapping of mappings of integers), read strictly."""
    data: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        if not line.startswith(" "):
            key, rest = line.split(":")
            assert rest == "", line
            data[key] = {}
        else:
            assert line.startswith("  ") and not line.startswith("   "), line
            name, value = line.strip().split(": ")
            data[list(data)[-1]][name] = int(value)
    return data


def test_deepspeed_reads_the_three_batch_numbers_the_optimizer_and_a_linear_warmup() -> None:
    plan = _plan()
    config = json.loads(export_plan(plan, "deepspeed").text)
    assert config["train_batch_size"] == 8192
    assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * plan.world_size == 8192
    assert config["optimizer"] == {"type": "SGD", "params": {"lr": 3.2}}
    assert config["scheduler"] == {"type": "WarmupLR", "params": {
        "warmup_min_lr": 0.1, "warmup_max_lr": 3.2, "warmup_num_steps": 785, "warmup_type": "linear",
    }}


@pytest.mark.parametrize(("optimizer", "section"), [
    ("adam", {"type": "Adam", "params": {"lr": 0.4, "adam_w_mode": False}}),  # DeepSpeed's Adam is AdamW otherwise
    ("adamw", {"type": "AdamW", "params": {"lr": 0.4}}),
    ("lamb", {"type": "Lamb", "params": {"lr": 0.4}}),
])
def test_deepspeed_names_its_own_adam_family_optimizers(optimizer: str, section: dict[str, object]) -> None:
    config = json.loads(export_plan(_plan(optimizer=optimizer, global_batch=4096, base_lr=0.1, base_batch=256), "deepspeed").text)
    assert config["optimizer"] == section  # sqrt(16) x 0.1


def test_deepspeed_has_no_lars_so_it_is_left_to_the_user() -> None:
    exported = export_plan(_plan(optimizer="lars"), "deepspeed")
    assert "optimizer" not in json.loads(exported.text)
    assert any("no lars" in note for note in exported.notes)


def test_without_a_recipe_no_rate_is_invented() -> None:
    plan = _plan(base_lr=None, base_batch=None)
    config = json.loads(export_plan(plan, "deepspeed").text)
    assert set(config) == {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
    assert "learning_rate" not in json.loads(export_plan(plan, "hf").text)


def test_hf_reads_training_arguments() -> None:
    arguments = json.loads(export_plan(_plan(), "hf").text)
    assert set(arguments) <= HF_FIELDS
    assert arguments == {"per_device_train_batch_size": 64, "gradient_accumulation_steps": 4, "learning_rate": 3.2, "warmup_steps": 785}


def test_a_warmup_known_only_in_epochs_is_left_out_and_said() -> None:
    exported = export_plan(_plan(dataset_size=None, epochs=None), "hf")
    assert "warmup_steps" not in json.loads(exported.text)
    assert any("--dataset-size" in note for note in exported.notes)


def test_lightning_reads_accumulation_devices_and_nodes() -> None:
    exported = export_plan(_plan(), "lightning")
    assert _read_yaml_mapping(exported.text) == {"trainer": {"accumulate_grad_batches": 4, "devices": 8, "num_nodes": 4}}
    assert any("batch_size=64" in note for note in exported.notes)


def test_torchrun_reads_nnodes_and_nproc_per_node() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--nnodes", type=int, required=True)
    parser.add_argument("--nproc_per_node", type=int, required=True)
    exported = export_plan(_plan(), "torchrun")
    assert vars(parser.parse_args(shlex.split(exported.text))) == {"nnodes": 4, "nproc_per_node": 8}
    assert any("--node_rank" in note for note in exported.notes)



def test_a_limit_that_assumes_ddps_bucket_view_says_so_in_every_export(tmp_path) -> None:
    from plan_helpers import probe_data, save_probe

    save_probe(tmp_path, probe_data())
    viewed = make_plan(PlanOptions(1024, gpus_per_node=4, strategy="ddp", bucket_view=True), cwd=tmp_path)
    plain = make_plan(PlanOptions(1024, gpus_per_node=4, strategy="ddp"), cwd=tmp_path)
    assert viewed.bucket_view and viewed.to_dict()["bucket_view"] is True and not plain.bucket_view
    for tool in ("deepspeed", "hf", "lightning", "torchrun"):
        assert any("gradient_as_bucket_view=True" in note for note in export_plan(viewed, tool).notes), tool
        assert not any("bucket_view" in note for note in export_plan(plain, tool).notes), tool
    assert any("DDPStrategy(gradient_as_bucket_view=True)" in note for note in export_plan(viewed, "lightning").notes)
    # A probe that ran under DDP with the bucket view, its limit taken as it is.
    save_probe(tmp_path, probe_data(world_size=4, strategy="ddp", bucket_view=True))
    assert make_plan(PlanOptions(1024, gpus_per_node=4), cwd=tmp_path).bucket_view
    assert not make_plan(PlanOptions(1024, gpus_per_node=4, max_micro=16), cwd=tmp_path).bucket_view


def test_a_limit_measured_with_checkpointing_and_lora_carries_them_into_the_exports(tmp_path: Path) -> None:
    """HF TrainingArguments turn gradient checkpointing on; every export says what the limit assumes."""
    data = probe_data()
    data["model"]["settings"] = {"gradient_checkpointing": True, "lora": "r=8,alpha=16"}
    plan = _plan(global_batch=512, gpus_per_node=8, nodes=1, max_micro=None, probe_file=save_probe(tmp_path, data))
    hf = export_plan(plan, "hf")
    arguments = json.loads(hf.text)
    assert arguments["gradient_checkpointing"] is True and set(arguments) <= HF_FIELDS | {"gradient_checkpointing", "bf16"}
    assert arguments.get("bf16", False) == (data["precision"] == "bf16")  # the precision the probe ran at, carried too
    assert any("LoRA r=8,alpha=16" in note for note in hf.notes)
    torchrun = export_plan(plan, "torchrun")
    assert any("gradient checkpointing" in note for note in torchrun.notes)
    plain = _plan(global_batch=512, gpus_per_node=8, nodes=1, max_micro=None, probe_file=save_probe(tmp_path, probe_data()))
    assert "gradient_checkpointing" not in json.loads(export_plan(plain, "hf").text)
