"""Models with no model file: Hugging Face configs (hf:), factories (MODULE:CALLABLE), a model file's
make_batch(batch_size, seq_len); the knobs that change memory (gradient checkpointing, LoRA); and
the sweep over sequence lengths."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MODELS, bsplan

from bsplan.backends.fake import FakeDevice
from bsplan.measure.options import ProbeOptions
from bsplan.measure.probe import run_probe
from bsplan.measure.workload import load_workload
from bsplan.models.source import Lora, ModelSource, SourceKind, Task, parse_lora, parse_seq_lens
from bsplan.planning.errors import BadInput
from bsplan.planning.results import ProbeResult, SweepResult, SweepRow

pytest.importorskip("transformers")
pytest.importorskip("peft")

HF = MODELS / "hf"
LLAMA = f"hf:{HF / 'llama-tiny'}"
UNBOUNDED = 1 << 40


class _Quiet:
    def started(self, batch: int) -> None: ...
    def finished(self, trial: object) -> None: ...
    def note(self, text: str) -> None: ...


def _peak(source: ModelSource, batch: int, traced: bool) -> ProbeResult:
    options = ProbeOptions(device="cpu", memory_limit=UNBOUNDED, min_batch=batch, max_batch=batch, steps=2)
    return run_probe(source, options, _Quiet(), backend=FakeDevice(UNBOUNDED, "traced") if traced else None)


# --- the source as given --------------------------------------------------------------------------


def test_the_kind_of_a_source_is_read_from_its_text() -> None:
    assert ModelSource("examples/mlp.py").kind is SourceKind.file
    assert ModelSource(LLAMA).kind is SourceKind.hf
    assert ModelSource("factories:classifier", input_shape=(1, 16, 16)).kind is SourceKind.factory


@pytest.mark.parametrize(("text", "lengths"), [("512", (512,)), ("128,256,512", (128, 256, 512)), (None, None)])
def test_seq_len_is_one_length_or_a_list(text: str | None, lengths: tuple[int, ...] | None) -> None:
    assert parse_seq_lens(text) == lengths


@pytest.mark.parametrize(("text", "says"), [("0", "at least 1"), ("128,abc", "whole numbers"), ("128,128", "twice")])
def test_bad_seq_lens_are_refused_in_one_sentence(text: str, says: str) -> None:
    with pytest.raises(BadInput, match=says):
        parse_seq_lens(text)


def test_lora_options() -> None:
    assert parse_lora("r=8") == Lora(8, 16, None)
    assert parse_lora("r=16,alpha=8,targets=q_proj+v_proj") == Lora(16, 8, ("q_proj", "v_proj"))
    for bad in ("8", "alpha=4", "r=8,rank=3", "r=0"):
        with pytest.raises(BadInput):
            parse_lora(bad)


@pytest.mark.parametrize(("source", "says"), [
    (lambda: ModelSource("examples/mlp.py", task=Task.causal_lm), "--task applies to hf:"),
    (lambda: ModelSource(LLAMA, input_shape=(3, 8, 8)), "--input-shape describes the input of a MODULE:CALLABLE"),
    (lambda: ModelSource("factories:classifier"), "describe the input"),
    (lambda: ModelSource("factories:classifier", vocab=100), "--vocab needs --seq-len"),
])
def test_options_that_do_not_apply_are_refused(source: object, says: str) -> None:
    with pytest.raises(BadInput, match=says):
        source()  # type: ignore[operator]


# --- Hugging Face configs -------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "task", "keys"), [
    ("llama-tiny", Task.causal_lm, {"input_ids", "labels"}),
    ("gpt2-tiny", Task.causal_lm, {"input_ids", "labels"}),
    ("bert-tiny", Task.masked_lm, {"input_ids", "labels"}),
    ("t5-tiny", Task.seq2seq_lm, {"input_ids", "labels"}),
    ("vit-tiny", Task.image_classification, {"pixel_values", "labels"}),
])
def test_a_config_gives_its_head_and_a_batch_the_model_returns_a_loss_for(config: str, task: Task, keys: set[str]) -> None:
    import torch

    workload = load_workload(ModelSource(f"hf:{HF / config}", seq_len=None if task is Task.image_classification else 16))
    assert workload.module.task is task
    batch = workload.make_batch(2, torch.device("cpu"))
    assert set(batch) == keys
    assert batch[next(iter(keys - {"labels"}))].shape[0] == 2
    loss = workload.loss(workload.build_model(), batch)
    assert loss.numel() == 1 and torch.isfinite(loss)


def test_task_and_target_length_can_be_chosen() -> None:
    import torch

    classifier = load_workload(ModelSource(f"hf:{HF / 'bert-tiny'}", seq_len=16, task=Task.sequence_classification))
    assert classifier.make_batch(3, torch.device("cpu"))["labels"].shape == (3,)
    seq2seq = load_workload(ModelSource(f"hf:{HF / 't5-tiny'}", seq_len=16, target_len=5))
    batch = seq2seq.make_batch(2, torch.device("cpu"))
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].shape == (2, 5)


@pytest.mark.parametrize(("config", "seq_len"), [("llama-tiny", 64), ("gpt2-tiny", 64), ("bert-tiny", 64), ("t5-tiny", 32),
                                                 ("vit-tiny", None)])
def test_the_trace_counts_the_bytes_the_counted_cpu_counts_on_each_config(config: str, seq_len: int | None) -> None:
    """Byte for byte: transformers' data-dependent mask and init paths are made to agree."""
    source = ModelSource(f"hf:{HF / config}", seq_len=seq_len)
    real, traced = _peak(source, 4, traced=False), _peak(source, 4, traced=True)
    assert real.peak_bytes == traced.peak_bytes
    assert real.peak_bytes is not None and real.peak_bytes > 0


@pytest.mark.parametrize("knob", [{"gradient_checkpointing": True}, {"lora": Lora(8, 16)}])
def test_checkpointing_and_lora_each_lower_the_peak_measured_and_traced(knob: dict[str, object]) -> None:
    plain = ModelSource(LLAMA, seq_len=128)
    changed = ModelSource(LLAMA, seq_len=128, **knob)  # type: ignore[arg-type]
    before, after = _peak(plain, 8, traced=False), _peak(changed, 8, traced=False)
    assert after.peak_bytes < before.peak_bytes  # type: ignore[operator]
    assert _peak(changed, 8, traced=True).peak_bytes == after.peak_bytes
    settings = after.model.settings
    if "lora" in knob:
        assert settings["lora"] == "r=8,alpha=16"
        assert after.model.trainable_parameters is not None and after.model.trainable_parameters < after.model.parameters
        assert after.breakdown.gradient_bytes < before.breakdown.gradient_bytes
    else:
        assert settings["gradient_checkpointing"] is True and after.model.trainable_parameters is None


def test_hf_errors_are_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = {
        "hf:no-such-org/no-such-model": "no Hugging Face config 'no-such-org/no-such-model'",
        "hf:": "hf: needs a config",
    }
    (tmp_path / "nomodel.json").write_text('{"hidden_size": 8}')
    cases[f"hf:{tmp_path / 'nomodel.json'}"] = "has no model_type"
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text('{"model_type": "not-an-architecture"}')
    cases[f"hf:{tmp_path / 'unknown'}"] = "cannot read the Hugging Face config"
    for text, says in cases.items():
        with pytest.raises(BadInput, match=says):
            load_workload(ModelSource(text))
    with pytest.raises(BadInput, match="does not apply"):
        load_workload(ModelSource(f"hf:{HF / 'vit-tiny'}", seq_len=64))
    with pytest.raises(BadInput, match="longer than the 512 positions"):
        load_workload(ModelSource(f"hf:{HF / 'gpt2-tiny'}", seq_len=513))
    with pytest.raises(BadInput, match="no token ids"):
        load_workload(ModelSource(f"hf:{HF / 'vit-tiny'}", task=Task.causal_lm))
    with pytest.raises(BadInput, match="name the modules to adapt"):
        load_workload(ModelSource(f"hf:{HF / 'vit-tiny'}", lora=Lora(4, 8))).build_model()


# --- factories and model files with a sequence length ---------------------------------------------


def test_a_factory_with_a_float_input_and_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(MODELS))
    result = _peak(ModelSource("factories:classifier", input_shape=(1, 16, 16), num_classes=10), 32, traced=False)
    assert result.max_batch == 32 and result.model.file == "factories:classifier"
    assert _peak(ModelSource("factories:classifier", input_shape=(1, 16, 16), num_classes=10), 32, traced=True).peak_bytes == result.peak_bytes


def test_a_factory_with_token_ids_checkpoints_its_block_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(MODELS))
    plain = _peak(ModelSource("factories:TinyLM", vocab=256, seq_len=64), 8, traced=False)
    checkpointed = _peak(ModelSource("factories:TinyLM", vocab=256, seq_len=64, gradient_checkpointing=True), 8, traced=False)
    assert checkpointed.peak_bytes < plain.peak_bytes  # type: ignore[operator]


def test_factory_errors_are_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(MODELS))
    for text, says in (("no_such_module:build", "cannot import no_such_module"), ("factories:nothing", "has no nothing"),
                       ("factories:not_a_model", "returned int, not a torch.nn.Module")):
        with pytest.raises(BadInput, match=says):
            load_workload(ModelSource(text, input_shape=(4,))).build_model()
    with pytest.raises(BadInput, match="no list of repeated blocks"):
        load_workload(ModelSource("factories:classifier", input_shape=(1, 16, 16), gradient_checkpointing=True)).build_model()


def test_a_model_file_takes_the_sequence_length_as_make_batch_s_second_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(MODELS))
    import torch

    workload = load_workload(ModelSource(str(MODELS / "seq_lm.py"), seq_len=40))
    assert workload.make_batch(3, torch.device("cpu")).shape == (3, 40)
    with pytest.raises(BadInput, match="give --seq-len"):
        load_workload(ModelSource(str(MODELS / "seq_lm.py")))
    with pytest.raises(BadInput, match=r"needs make_batch\(batch_size, seq_len\)"):
        load_workload(ModelSource(str(MODELS / "tiny.py"), seq_len=40))


# --- sweeps ----------------------------------------------------------------------------------------


def test_the_token_budget_is_the_smallest_max_tokens_and_none_where_a_length_fits_nothing() -> None:
    short = _peak(ModelSource(LLAMA, seq_len=32), 8, traced=True)
    long = _peak(ModelSource(LLAMA, seq_len=64), 2, traced=True)
    sweep = SweepResult("probe", (SweepRow(32, short), SweepRow(64, long)))
    assert sweep.token_budget is not None and (sweep.token_budget.tokens, sweep.token_budget.seq_len) == (128, 64)
    data = sweep.to_dict()
    assert data["schema"] == "bsplan.sweep/1"
    assert [row["max_tokens"] for row in data["sweep"]] == [256, 128]
    assert data["sweep"][0]["result"]["seq_len"] == 32
    nothing = SweepResult("probe", (SweepRow(32, short), SweepRow(64, _peak_none(long))))
    assert nothing.token_budget is None


def _peak_none(result: ProbeResult) -> ProbeResult:
    from dataclasses import replace

    return replace(result, max_batch=None)


@pytest.mark.slow
def test_a_probe_sweep_is_exact_at_each_length_and_plans_in_tokens(workdir: Path) -> None:
    """max_batch falls as seq_len grows; each length's answer fits alone in a fresh process and one
    more does not; the estimate traces the same answers; the saved sweep plans a token target."""
    common = ["--device", "cpu", "--memory-limit", "48MiB"]
    swept = bsplan("probe", LLAMA, *common, "--seq-len", "64,256", "--json", cwd=workdir)
    assert swept.code == 0, swept.stderr
    data = swept.json()
    batches = [row["max_batch"] for row in data["sweep"]]
    assert batches == sorted(batches, reverse=True) and batches[0] > batches[-1] > 0
    assert [row["max_tokens"] for row in data["sweep"]] == [b * n for b, n in zip(batches, (64, 256))]
    assert data["token_budget"]["tokens"] == min(b * n for b, n in zip(batches, (64, 256)))
    estimated = bsplan("estimate", LLAMA, "--memory", "48MiB", "--seq-len", "64,256", "--json", cwd=workdir)
    assert estimated.code == 0, estimated.stderr
    assert [row["max_batch"] for row in estimated.json()["sweep"]] == batches
    assert all(row["result"]["method"] == "trace" for row in estimated.json()["sweep"])
    longest = str(batches[1])
    for batch, code in ((longest, 0), (str(batches[1] + 1), 3)):
        alone = bsplan("probe", LLAMA, *common, "--seq-len", "256", "--min-batch", batch, "--max-batch", batch, "--json",
                       "--no-save", cwd=workdir)
        assert alone.code == code, alone.stderr
    planned = bsplan("plan", "--target-tokens", f"{batches[1] * 256 * 4}", "--seq-len", "256", "--use", "max", "--json",
                     cwd=workdir)
    assert planned.code == 0, planned.stderr
    plan = planned.json()
    assert plan["tokens_per_step"] == batches[1] * 256 * 4 and plan["seq_len"] == 256


@pytest.mark.slow
def test_estimate_of_a_config_for_a_gpu_traces_at_a_long_length(workdir: Path) -> None:
    run = bsplan("estimate", LLAMA, "--gpu", "H100-80GB", "--seq-len", "4096", "--json", cwd=workdir)
    assert run.code == 0, run.stderr
    data = run.json()
    assert data["method"] == "trace" and data["seq_len"] == 4096 and data["model"]["settings"]["task"] == "causal-lm"
    assert data["max_batch"] > 0


def test_an_optimizer_asked_for_replaces_the_model_file_s() -> None:
    """AdamW keeps two states per parameter, SGD with momentum one, Adafactor factored rows and columns."""
    from bsplan.models.source import OPTIMIZERS

    states = {name: _peak(ModelSource("examples/mlp.py", optimizer=name), 8, traced=False).breakdown.optimizer_state_bytes
              for name in OPTIMIZERS}
    parameters = _peak(ModelSource("examples/mlp.py"), 8, traced=False).breakdown.parameter_bytes
    assert states["sgd"] == parameters and states["adamw"] >= 2 * parameters and states["adafactor"] < parameters / 10
    with pytest.raises(BadInput, match="unknown optimizer"):
        ModelSource("examples/mlp.py", optimizer="lion")


# --- what the review of the first version found ---------------------------------------------------


def test_a_sweep_checks_every_length_first_and_keeps_its_rows_through_ctrl_c() -> None:
    from bsplan.measure.sweep import sweep

    measured: list[int] = []

    def measure(source: ModelSource) -> ProbeResult:
        measured.append(source.seq_len)  # type: ignore[arg-type]
        if len(measured) == 2:
            raise KeyboardInterrupt
        return _peak(source, 2, traced=True)

    gpt2 = ModelSource(f"hf:{HF / 'gpt2-tiny'}")
    with pytest.raises(BadInput, match="longer than the 512 positions"):
        sweep("estimate", measure, gpt2, (64, 1024), _Quiet())
    assert measured == []
    result = sweep("estimate", measure, gpt2, (32, 64, 128), _Quiet())
    assert result.interrupted and [row.seq_len for row in result.rows] == [32] and result.token_budget is None
    assert result.to_dict()["model"]["seq_len"] is None and result.to_dict()["interrupted"] is True


def test_a_capped_length_makes_the_budget_a_lower_bound() -> None:
    capped = _peak(ModelSource(LLAMA, seq_len=32), 4, traced=True)
    assert capped.capped_at == 4
    budget = SweepResult("estimate", (SweepRow(32, capped),)).token_budget
    assert budget is not None and budget.capped and budget.tokens == 128


def test_sources_that_cannot_be_built_are_bad_input_not_the_user_s_error(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from bsplan.planning.errors import UserCodeError

    gpt2 = f"hf:{HF / 'gpt2-tiny'}"
    with pytest.raises(BadInput, match="cannot build"):
        load_workload(ModelSource(gpt2, task=Task.image_classification)).build_model()
    with pytest.raises(BadInput, match="--target-len sets the decoder"):
        load_workload(ModelSource(gpt2, seq_len=16, target_len=8))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(BadInput, match="no JSON object"):
        load_workload(ModelSource(f"hf:{tmp_path / 'list.json'}"))
    with pytest.raises(BadInput, match="not to the float input"):
        ModelSource("factories:classifier", input_shape=(4,), seq_len=8)
    with pytest.raises(BadInput, match="joined by"):
        parse_lora("r=4,targets=+")
    (tmp_path / "raising.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserCodeError, match="broken at import") as raised:
        load_workload(ModelSource("raising:build", input_shape=(4,)))
    assert "raising.py" in raised.value.traceback_text


def test_a_decoder_s_classification_head_gets_a_padding_token() -> None:
    import torch

    workload = load_workload(ModelSource(LLAMA, seq_len=16, task=Task.sequence_classification))
    loss = workload.loss(workload.build_model(), workload.make_batch(3, torch.device("cpu")))
    assert torch.isfinite(loss)


def test_params_alone_refuses_the_options_that_describe_a_model() -> None:
    run = bsplan("estimate", "--params", "7B", "--gpu", "h100", "--lora", "r=8", "--json")
    assert run.code == 2 and "--lora describes a model" in run.json()["error"]


def test_mixed_precision_trains_bf16_weights_through_fp32_master_weights() -> None:
    """--precision mixed: the weights and gradients are bf16, the optimizer steps fp32 copies of them
    (so an update smaller than bf16 resolves accumulates there) and its state counts those copies."""
    import torch

    from bsplan.models.knobs import MasterWeights, to_bf16
    from bsplan.measure.trial import state_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    to_bf16(model)
    reference = [p.detach().float() for p in model.parameters()]  # the masters start from the bf16 weights
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    optimizer = MasterWeights(model.parameters(), lambda params: torch.optim.SGD(params, lr=1e-4))
    inputs = torch.randn(16, 8, dtype=torch.bfloat16)
    for _ in range(3):
        model(inputs).float().pow(2).mean().backward()
        grads = [p.grad.float() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad()
        reference = [r - 1e-4 * g for r, g in zip(reference, grads)]
    for weight, master, expected in zip(model.parameters(), optimizer.masters, reference):
        assert master.dtype == torch.float32 and torch.allclose(master, expected, atol=1e-6)
        assert torch.equal(weight, master.to(torch.bfloat16)) and weight.grad is None
    assert state_bytes(optimizer) == sum(4 * p.numel() for p in model.parameters())  # SGD without momentum: the masters alone
    import bsplan as bsplan_api

    tiny = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))  # tests/models/tiny.py
    probed = bsplan_api.probe(lambda: tiny, lambda size: torch.randn(size, 64), optimizer=lambda params: torch.optim.SGD(params, lr=0.1), device="cpu",
                          memory_limit="1MiB", precision="mixed", max_batch=8)
    breakdown = probed.breakdown  # the masters are the only state SGD without momentum keeps, and counted as such
    assert breakdown.parameter_bytes == breakdown.optimizer_state_bytes / 2 == 18696 * 2
