"""The gradient noise scale: the estimator's arithmetic, `bsplan noise` and the runtime NoiseScale
against exact values (a closed form, and per-sample gradients over a real dataset), its errors, and
what `bsplan plan --noise-scale` makes of it."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Iterator

import pytest
from conftest import EXAMPLES, MODELS, bsplan
from no_torch import run_without_torch

from bsplan.planning.errors import BadInput
from bsplan.planning.noise import (
    MovingNoise, NoiseEfficiency, NoiseOptions, NoiseSample, batch_sizes, bootstrap, noise_efficiency, ratio, relative_error,
    unbiased,
)
from bsplan.planning.plan import PlanOptions
from bsplan.planning.planner import make_plan

DIGITS = EXAMPLES / "noise_digits.py"
LINEAR = MODELS / "noise_linear.py"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: torch's threads only contend (ten times slower on a busy 2-CPU machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


class Quiet:
    def measured(self, steps: int, noise_scale: float | None, relative_error: float) -> None: ...
    def note(self, text: str) -> None: ...


# --- the arithmetic (no torch) ------------------------------------------------------------------

def test_the_estimates_invert_the_expected_norms_exactly() -> None:
    """E|G_B|² = |G|² + tr(Σ)/B at two batch sizes: the estimates are linear, so unbiased."""
    norm, trace = 2.0, 30.0
    sample = unbiased(norm + trace / 4, norm + trace / 32, 4, 32)
    assert sample.gradient_norm_squared == pytest.approx(norm) and sample.trace_sigma == pytest.approx(trace)


def test_the_estimates_are_unbiased_on_drawn_gradients() -> None:
    """Per-sample gradients G + noise with a known covariance: averaged over many draws, the
    estimates land on |G|² and tr(Σ)."""
    rng = random.Random(0)
    mean, sigma = [1.0, -0.5, 0.25], [2.0, 1.0, 3.0]  # |G|² = 1.3125, tr(Σ) = 14

    def batch_mean(size: int) -> list[float]:
        return [sum(m + s * rng.gauss(0, 1) for _ in range(size)) / size for m, s in zip(mean, sigma)]

    samples = []
    for _ in range(4000):
        small = [batch_mean(2) for _ in range(4)]  # four micro-batches of 2 make one batch of 8
        big = [sum(column) / 4 for column in zip(*small)]
        small_sq = sum(sum(x * x for x in g) for g in small) / 4
        samples.append(unbiased(small_sq, sum(x * x for x in big), 2, 8))
    assert sum(s.gradient_norm_squared for s in samples) / len(samples) == pytest.approx(1.3125, rel=0.1)
    assert sum(s.trace_sigma for s in samples) / len(samples) == pytest.approx(14, rel=0.05)
    assert ratio(samples) == pytest.approx(14 / 1.3125, rel=0.15)


def test_the_ratio_of_means_its_error_and_its_bootstrap_interval() -> None:
    samples = [NoiseSample(1.0 + 0.1 * (i % 3), 50.0 + (i % 5)) for i in range(40)]
    value = ratio(samples)
    assert value == pytest.approx(sum(s.trace_sigma for s in samples) / sum(s.gradient_norm_squared for s in samples))
    low, high = bootstrap(samples)
    assert low is not None and high is not None and low < value < high
    assert bootstrap(samples) == (low, high)  # seeded: the same steps give the same interval
    assert 0 < relative_error(samples) < 0.05
    assert bootstrap(samples[:1]) == (None, None) and math.isinf(relative_error(samples[:1]))


def test_a_gradient_hidden_by_noise_has_no_noise_scale() -> None:
    samples = [NoiseSample(-1.0, 10.0), NoiseSample(0.5, 10.0)]
    assert ratio(samples) is None and math.isinf(relative_error(samples))
    assert bootstrap(samples)[1] is None  # the interval has no upper end


def test_the_moving_average_is_readable_from_the_first_step() -> None:
    moving = MovingNoise(0.99)
    assert moving.value is None
    moving.update(NoiseSample(2.0, 100.0))
    assert moving.value == pytest.approx(50) and moving.gradient_norm_squared == pytest.approx(2)  # bias-corrected
    moving.update(NoiseSample(2.0, 100.0))
    assert moving.trace_sigma == pytest.approx(100)


def test_batch_size_defaults_and_checks() -> None:
    assert batch_sizes(None, None, None) == (32, 256)
    assert batch_sizes(None, None, 12) == (12, 96)  # a saved probe's smaller recommended batch
    assert batch_sizes(None, 100, None) == (10, 100)  # the largest divisor up to an eighth
    assert batch_sizes(16, None, None) == (16, 128)
    with pytest.raises(BadInput, match="not a multiple of --small-batch 32"):
        batch_sizes(32, 100, None)
    with pytest.raises(BadInput, match="must be larger than --small-batch"):
        NoiseOptions(small_batch=64, big_batch=64)
    with pytest.raises(BadInput, match="--checkpoint nowhere.pt does not exist"):
        NoiseOptions(checkpoint=Path("nowhere.pt"))


# --- measured against exact values ----------------------------------------------------------------

def test_bsplan_noise_matches_the_closed_form_of_linear_regression() -> None:
    from bsplan.measure.noise import run_noise

    exact = 51.0  # tests/models/noise_linear.py: (d + 1) + d s² with d = 10, s = 2
    result = run_noise(LINEAR, NoiseOptions(small_batch=8, big_batch=64, rel_error=0.03, max_steps=1000), Quiet())
    assert result.stopped == "rel-error" and result.noise_scale == pytest.approx(exact, rel=0.15)
    assert result.gradient_norm_squared == pytest.approx(1.0, rel=0.2) and result.trace_sigma == pytest.approx(51, rel=0.15)
    assert result.noise_scale_low is not None and result.noise_scale_high is not None
    assert result.noise_scale_low < result.noise_scale < result.noise_scale_high


def test_the_runtime_estimator_matches_the_closed_form() -> None:
    import torch

    from bsplan.measure.workload import load_workload
    from bsplan.runtime.noise import NoiseScale

    torch.manual_seed(0)
    workload = load_workload(LINEAR)
    model = workload.build_model()
    noise = NoiseScale(model, micro_batch=8, accumulation_steps=8, beta=0.995)
    for _ in range(600):  # fixed weights: the gradients are read, never applied
        for _ in range(8):
            (workload.loss(model, workload.make_batch(8, torch.device("cpu"))) / 8).backward()
        noise.step()
        model.zero_grad()
    noise.close()
    assert noise.value == pytest.approx(51.0, rel=0.15) and noise.gradient_norm_squared == pytest.approx(1.0, rel=0.2)


def test_autobatch_feeds_the_noise_scale_with_micro_batches_of_unequal_size() -> None:
    """Batches of 36 in micro-batches of 16, 16 and 4, as AutoBatch splits them: each weighed by its
    samples, the estimate lands on the closed form (weighed alike, it comes out at 62 to 66)."""
    import torch

    from bsplan.measure.workload import load_workload
    from bsplan.runtime.autobatch import AutoBatch
    from bsplan.runtime.noise import NoiseScale

    torch.manual_seed(0)
    workload = load_workload(LINEAR)
    model = workload.build_model()
    noise = NoiseScale(model, beta=0.999)
    auto = AutoBatch(16, reduction="mean", noise=noise)
    for _ in range(1000):  # fixed weights: the gradients are read, never applied
        auto.step(model, workload.make_batch(36, torch.device("cpu")), workload.loss)
    assert noise.steps == 1000 and noise.value == pytest.approx(51.0, rel=0.1)
    assert noise.gradient_norm_squared == pytest.approx(1.0, rel=0.1)
    with pytest.raises(ValueError, match="without sizes is fed by AutoBatch"):
        noise.step()  # by hand it needs the sizes


@pytest.fixture(scope="module")
def digits_exact() -> float:
    """The exact noise scale of examples/noise_digits.py at its initial weights."""
    pytest.importorskip("sklearn")
    from bsplan.measure.noise import exact_noise
    from bsplan.measure.workload import load_workload

    workload = load_workload(DIGITS)
    return exact_noise(workload, workload.build_model(), workload.module.dataset()).noise_scale


def test_the_exact_value_is_the_per_sample_definition(digits_exact: float) -> None:
    """vmap over grad against a plain loop over single samples, on part of the digits."""
    import torch

    from bsplan.measure.noise import exact_noise, squared_norm
    from bsplan.measure.workload import load_workload

    workload = load_workload(DIGITS)
    model = workload.build_model()
    inputs, labels = workload.module.dataset()
    part = (inputs[:100], labels[:100])
    grads = [torch.autograd.grad(workload.loss(model, (inputs[i:i + 1], labels[i:i + 1])), list(model.parameters()))
             for i in range(100)]
    mean = [sum(g[k] for g in grads) / 100 for k in range(len(grads[0]))]
    norm = squared_norm(mean)
    trace = sum(squared_norm([a - b for a, b in zip(g, mean)]) for g in grads) / 100
    exact = exact_noise(workload, model, part, chunk=32)
    assert exact.gradient_norm_squared == pytest.approx(norm, rel=1e-6) and exact.trace_sigma == pytest.approx(trace, rel=1e-6)
    assert 10 < digits_exact < 1000


@pytest.mark.slow
def test_bsplan_noise_on_real_digits_matches_the_exact_value(digits_exact: float, tmp_path: Path) -> None:
    run = bsplan("noise", str(DIGITS), "--json", cwd=tmp_path, env=ONE_THREAD)
    assert run.code == 0, run.stderr
    data = run.json()
    assert data["schema"] == "bsplan.noise/1" and data["data"] == "train_batches" and data["steps"] >= 30
    assert data["noise_scale"] == pytest.approx(digits_exact, rel=0.15)
    assert data["noise_scale_low"] < data["noise_scale"] < data["noise_scale_high"]
    assert "step     1: noise scale" in run.stderr


def test_the_runtime_estimator_on_digits_matches_the_exact_value(digits_exact: float) -> None:
    import torch

    from bsplan.measure.workload import load_workload
    from bsplan.runtime.noise import NoiseScale

    torch.manual_seed(0)
    workload = load_workload(DIGITS)
    model = workload.build_model()
    noise = NoiseScale(model, micro_batch=16, accumulation_steps=8, beta=0.995)
    batches: Iterator = iter(())
    for _ in range(400):
        for _ in range(8):
            batch = next(batches, None)
            if batch is None:
                batches = workload.module.train_batches(16)
                batch = next(batches)
            (workload.loss(model, batch) / 8).backward()
        noise.step()
        model.zero_grad()
    assert noise.value == pytest.approx(digits_exact, rel=0.15)


def test_a_checkpoint_moves_the_noise_scale_and_is_measured_there(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    import torch

    from bsplan.measure.noise import exact_noise, run_noise
    from bsplan.measure.workload import load_workload

    workload = load_workload(DIGITS)
    model = workload.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = workload.module.dataset()
    for _ in range(30):  # full-batch descent: a lower loss, a smaller gradient, a larger noise scale (71 -> 174)
        optimizer.zero_grad()
        workload.loss(model, data).backward()
        optimizer.step()
    torch.save(model.state_dict(), tmp_path / "digits.pt")
    exact = exact_noise(workload, model, data).noise_scale
    result = run_noise(DIGITS, NoiseOptions(checkpoint=tmp_path / "digits.pt", rel_error=0.05, max_steps=400), Quiet())
    assert result.checkpoint == str(tmp_path / "digits.pt") and result.noise_scale == pytest.approx(exact, rel=0.15)


# --- errors: one sentence, exit 2 -----------------------------------------------------------------

@pytest.mark.slow
def test_a_model_file_without_real_data_is_refused_unless_allowed(tmp_path: Path) -> None:
    run = bsplan("noise", str(EXAMPLES / "mlp.py"), cwd=tmp_path, env=ONE_THREAD)
    assert run.code == 2 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and "defines no train_batches(batch_size)" in run.stderr
    assert "--allow-synthetic" in run.stderr
    synthetic = bsplan("noise", str(EXAMPLES / "mlp.py"), "--allow-synthetic", "--max-steps", "2", "--json", cwd=tmp_path,
                       env=ONE_THREAD)
    assert synthetic.code == 0 and synthetic.json()["data"] == "make_batch (synthetic)" and synthetic.json()["steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (("--small-batch", "32", "--big-batch", "100"), "--big-batch 100 is not a multiple of --small-batch 32"),
    (("--small-batch", "0"), "--small-batch must be a whole number of at least 1"),
    (("--checkpoint", "missing.pt"), "--checkpoint missing.pt does not exist"),
])
def test_bad_options_exit_2_in_one_sentence(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    run = bsplan("noise", str(DIGITS), *args, cwd=tmp_path, env=ONE_THREAD)
    assert run.code == 2 and message in run.stderr and run.stderr.count("\n") == 1


def test_batches_of_the_wrong_size_are_refused(tmp_path: Path) -> None:
    from bsplan.measure.noise import run_noise

    model = tmp_path / "short.py"
    model.write_text(LINEAR.read_text().replace("yield make_batch(batch_size)", "yield make_batch(batch_size - 1)"))
    with pytest.raises(BadInput, match=r"yielded a batch of 31 samples: it must yield exactly the batch size asked for"):
        run_noise(model, NoiseOptions(), Quiet())


def test_ctrl_c_keeps_the_steps_measured(tmp_path: Path) -> None:
    from bsplan.measure.noise import run_noise

    class Interrupt(Quiet):
        def measured(self, steps: int, noise_scale: float | None, relative_error: float) -> None:
            if steps == 3:
                raise KeyboardInterrupt

    result = run_noise(LINEAR, NoiseOptions(), Interrupt())
    assert result.interrupted and result.steps == 3 and result.noise_scale is not None


def test_noise_help_imports_no_torch(tmp_path: Path) -> None:
    assert "--small-batch" in run_without_torch("noise", "--help", cwd=tmp_path)


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    import torch

    from bsplan.measure.noise import run_noise

    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(BadInput, match="does not fit the model of"):
        run_noise(LINEAR, NoiseOptions(checkpoint=tmp_path / "other.pt"), Quiet())


# --- bsplan plan --noise-scale --------------------------------------------------------------------

def test_the_plan_gives_the_step_and_compute_ratios_and_warns(tmp_path: Path) -> None:
    plan = json.loads(run_without_torch("plan", "--target", "8192", "--gpus", "8", "--max-micro", "256", "--noise-scale", "500",
                                        "--json", cwd=tmp_path))
    noise = plan["noise"]
    assert noise["steps_ratio"] == pytest.approx(1 + 500 / 8192) and noise["examples_ratio"] == pytest.approx(1 + 8192 / 500)
    assert noise["noise_scale"] == 500 and noise["largest_efficient_batch"] == 1000 and noise["source"] == "--noise-scale"
    assert noise["efficient_target"] == 1000
    warning = next(w for w in plan["warnings"] if w["code"] == "beyond-noise-scale")
    assert "(at most 1000, 2x the noise scale: --target 1000 is 125 x 1 x 8 devices)" in warning["message"]
    assert "17.4x the fewest training examples" in warning["reason"]
    assert "arXiv:1812.06162" in warning["source"]


def test_no_warning_up_to_twice_the_noise_scale() -> None:
    plan = make_plan(PlanOptions(1000, max_micro=1000, noise=NoiseEfficiency(500, "--noise-scale")))
    assert plan.noise is not None and not [w for w in plan.warnings if w.code == "beyond-noise-scale"]
    assert plan.to_dict()["noise"]["steps_ratio"] == pytest.approx(1.5)
    assert make_plan(PlanOptions(1000, max_micro=1000)).to_dict()["noise"] is None


def test_the_warning_names_the_largest_efficient_batch_these_devices_split() -> None:
    """2B = 666 is no multiple of 8 devices: --target 664 is; with --multiple-of 128 none is."""
    noise = NoiseEfficiency(333, "--noise-scale")
    plan = make_plan(PlanOptions(8192, gpus_per_node=8, max_micro=128, noise=noise))
    assert plan.to_dict()["noise"]["efficient_target"] == 664
    warning = next(w for w in plan.warnings if w.code == "beyond-noise-scale")
    assert "(at most 666, 2x the noise scale: --target 664 is 83 x 1 x 8 devices)" in warning.message
    crowded = make_plan(PlanOptions(8192, gpus_per_node=8, max_micro=128, multiple_of=128, noise=noise))
    assert crowded.to_dict()["noise"]["efficient_target"] is None
    warning = next(w for w in crowded.warnings if w.code == "beyond-noise-scale")
    assert "(at most 666, 2x the noise scale; one step on these 8 devices takes at least 1024)" in warning.message


def test_strategy_auto_names_the_strategy_for_the_largest_efficient_batch(tmp_path: Path) -> None:
    """--strategy auto recommends zero1 for 1920 on 4 devices (120 x 4; ddp fits only 80 a device). With
    a noise scale of 150 the warning names --target 300 and its own recommendation: ddp, the simplest,
    at 75 x 1, as --strategy auto at --target 300 indeed plans it."""
    from test_strategies import _probe  # a probe whose strategies fit 80 (ddp) to 120 a device

    probe = _probe(tmp_path / "probe.json")
    plan = make_plan(PlanOptions(1920, gpus_per_node=4, probe_file=probe, strategy="auto",
                                 noise=NoiseEfficiency(150, "--noise-scale")))
    assert (plan.strategy, plan.micro_batch, plan.accumulation_steps) == ("zero1", 120, 4)
    assert plan.to_dict()["noise"]["efficient_target"] == 300
    warning = next(w for w in plan.warnings if w.code == "beyond-noise-scale")
    assert ("(at most 300, 2x the noise scale: --target 300 is 75 x 1 x 4 devices under ddp, the simplest strategy that "
            "needs the fewest accumulation steps there)") in warning.message
    efficient = make_plan(PlanOptions(300, gpus_per_node=4, probe_file=probe, strategy="auto"))
    assert (efficient.strategy, efficient.micro_batch, efficient.accumulation_steps) == ("ddp", 75, 1)


def test_the_noise_scale_is_read_from_a_saved_result(tmp_path: Path) -> None:
    saved = tmp_path / "noise.json"
    saved.write_text(json.dumps({"schema": "bsplan.noise/1", "noise_scale": 123.0}))
    assert noise_efficiency(str(saved)) == NoiseEfficiency(123.0, str(saved))
    for given, message in (("0", "--noise-scale must be a finite number more than 0"),
                           ("nowhere.json", "neither a number nor a file")):
        with pytest.raises(BadInput, match=message):
            noise_efficiency(given)
    saved.write_text(json.dumps({"schema": "bsplan.noise/1", "noise_scale": None}))
    with pytest.raises(BadInput, match="holds no noise scale"):
        noise_efficiency(str(saved))


def test_a_result_from_few_steps_says_its_interval_is_noise() -> None:
    from bsplan.planning.noise import NoiseResult, NoiseSample

    samples = [NoiseSample(1.0, 50.0), NoiseSample(1.2, 40.0)]
    few = NoiseResult.of(samples, model="m.py", device="cpu", data="train_batches", checkpoint=None, small_batch=8,
                         big_batch=64, stopped="max-steps", max_steps=2, rel_error=0.1, seconds=0.1, seed=0)
    assert any("only 2 steps measured" in note for note in few.notes)
