"""`--plot FILE`: the charts of a probe, an estimate and a sweep, refused before any trial when they
cannot be drawn; the inline bar of the trials table; the catalogue's 2026 GPUs; ROCm builds of torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import EXAMPLES, MODELS, ROOT, bsplan
from rich.console import Console

from bsplan.backends import nvml
from bsplan.backends.cuda import CudaDevice
from bsplan.cli import charts
from bsplan.cli.charts import check_plot, limit_bar, save_chart
from bsplan.cli.render import show_probe
from bsplan.planning.catalog import CATALOG, find_gpu
from bsplan.planning.errors import BadInput
from bsplan.planning.memory_line import GIB, MIB, MemoryLine, Overheads
from bsplan.planning.results import Breakdown, DeviceInfo, EstimateResult, ModelInfo, ProbeResult, SweepResult, SweepRow, Trial

PNG = b"\x89PNG\r\n\x1a\n"
NEW_GPUS = ("B200-180GB", "B300-288GB", "GB200-186GB", "H20-96GB", "H200-NVL-141GB", "RTX-5090-32GB", "RTX-PRO-6000-96GB",
            "MI300X-192GB", "MI325X-256GB", "MI355X-288GB")


@pytest.fixture
def mpl() -> None:
    pytest.importorskip("matplotlib")


def _probe(seq_len: int | None = None, scale: int = 1) -> ProbeResult:
    """A probe as `bsplan probe` returns it: three trials around a 300 MiB limit."""
    trials = (Trial(57 // scale, True, 150 * MIB, 2.5, 75.8), Trial(114 // scale, True, 298 * MIB, 4.5, 88.6),
              Trial(114 // scale + 1, False, None, 0.8, None, error="out of memory"))
    return ProbeResult(
        model=ModelInfo("examples/cnn.py", 106_000, False, seq_len=seq_len), device=DeviceInfo("cpu", "cpu", 300 * MIB, "--memory-limit", True),
        mode="train", precision="fp32", steps=3, multiple_of=1, headroom=0.1, max_batch=114 // scale, first_oom_batch=114 // scale + 1,
        recommended_batch=96 // scale, peak_bytes=298 * MIB, breakdown=Breakdown(416 * 1024, 416 * 1024, 416 * 1024, True, 2.6 * MIB),
        trials=trials, best_throughput_batch=114 // scale, efficient_batch=114 // scale,
    )


def _estimate() -> EstimateResult:
    """An estimate for an 80 GiB GPU from CPU trials at small batches: a line, overheads, no timings."""
    return EstimateResult(
        model=ModelInfo("examples/cnn.py", 106_000, False), device=DeviceInfo("H100-SXM-80GB", "cuda", 80 * GIB, "catalogue", False),
        mode="train", precision="fp32", steps=3, headroom=0.1, max_batch=30_829, recommended_batch=27_696, peak_bytes=int(78.6 * GIB),
        breakdown=Breakdown(416 * 1024, 416 * 1024, 416 * 1024, True, 2.6 * MIB), fit=MemoryLine(885 * 1024, 2.61 * MIB),
        overheads=Overheads(GIB, 18 * MIB, 22 * MIB), gpu=None,
        trials=(Trial(1, True, int(3.6 * MIB), 0.2, None), Trial(8, True, int(21.7 * MIB), 0.2, None)),
    )


def test_a_probe_is_drawn_as_png_and_svg_in_process(mpl: None, tmp_path: Path) -> None:
    png, svg = tmp_path / "charts" / "probe.png", tmp_path / "probe.svg"
    earlier = "matplotlib.pyplot" in sys.modules  # another library of the test session may have imported it
    save_chart(_probe(seq_len=512), png, Console())
    save_chart(_probe(), svg, Console())
    assert png.read_bytes().startswith(PNG) and 20_000 < png.stat().st_size < 2_000_000
    assert "<svg" in svg.read_text()[:1000]
    assert earlier or "matplotlib.pyplot" not in sys.modules  # figures on the Agg canvas: no pyplot, no window


def test_an_estimate_and_a_sweep_are_drawn(mpl: None, tmp_path: Path) -> None:
    sweep = SweepResult("probe", (SweepRow(512, _probe(512)), SweepRow(1024, _probe(1024, scale=2))))
    for name, result in (("estimate.png", _estimate()), ("sweep.png", sweep)):
        save_chart(result, tmp_path / name, Console())
        assert (tmp_path / name).read_bytes().startswith(PNG)


def test_a_chart_that_cannot_be_written_is_a_warning(mpl: None, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    console = Console(record=True, width=300)
    save_chart(_probe(), tmp_path / "file" / "chart.png", console)
    text = console.export_text()
    assert text.startswith(f"warning: could not write {tmp_path / 'file' / 'chart.png'}: ") and text.count("\n") == 1


def test_a_plot_that_cannot_be_drawn_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    check_plot(None)
    check_plot(Path("chart.SVG"))
    with pytest.raises(BadInput, match=r"^--plot chart.pdf must name a .png or .svg file$"):
        check_plot(Path("chart.pdf"))
    with pytest.raises(BadInput, match="--params has none"):
        check_plot(Path("chart.png"), has_trials=False)
    monkeypatch.setattr(charts.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BadInput, match=r"matplotlib, which is not installed: pip install 'bsplan\[plot\]'$"):
        check_plot(Path("chart.png"))


def test_the_inline_bar_shows_a_peak_against_the_limit() -> None:
    assert limit_bar(150, 300) == "█████░░░░░  50%"
    assert limit_bar(1, 80) == "▏░░░░░░░░░   1%"  # an eighth of a cell
    assert limit_bar(400, 300) == "██████████ 133%"  # past the limit: a full bar, the share says by how much
    assert limit_bar(None, 300) == "-"
    console = Console(record=True, width=140)
    show_probe(console, _probe())
    table = console.export_text()
    assert "share of 300 MiB" in table and "█████░░░░░  50%" in table and "█████████▉  99%" in table


# --- the command line --------------------------------------------------------------------------


@pytest.mark.slow
def test_probe_and_estimate_write_their_charts(mpl: None, workdir: Path) -> None:
    run = bsplan("probe", str(MODELS / "tiny.py"), "--device", "cpu", "--memory-limit", "8MiB", "--plot", "out.png", cwd=workdir)
    assert run.code == 0, run.stderr
    assert (workdir / "out.png").read_bytes().startswith(PNG) and (workdir / "out.png").stat().st_size > 20_000
    run = bsplan("estimate", str(MODELS / "tiny.py"), "--memory", "8MiB", "--plot", "charts/out.svg", "--json", cwd=workdir)
    assert run.code == 0, run.stderr
    assert "<svg" in (workdir / "charts" / "out.svg").read_text()[:1000] and run.json()["max_batch"] > 0


@pytest.mark.slow
def test_a_bad_suffix_is_refused_before_any_trial(workdir: Path) -> None:
    run = bsplan("probe", str(MODELS / "tiny.py"), "--device", "cpu", "--memory-limit", "8MiB", "--plot", "out.pdf", cwd=workdir)
    assert run.code == 2 and run.stdout == ""
    assert run.stderr == "error: --plot out.pdf must name a .png or .svg file\n"
    assert not (workdir / ".bsplan").exists() and not (workdir / "out.pdf").exists()


@pytest.mark.slow
def test_a_sweep_is_drawn(mpl: None, workdir: Path) -> None:
    pytest.importorskip("transformers")
    run = bsplan("estimate", f"hf:{MODELS / 'hf' / 'llama-tiny'}", "--memory", "48MiB", "--seq-len", "32,64", "--plot", "s.png", cwd=workdir)
    assert run.code == 0, run.stderr
    assert (workdir / "s.png").read_bytes().startswith(PNG) and (workdir / "s.png").stat().st_size > 20_000


@pytest.mark.slow
def test_help_and_plan_never_import_matplotlib(workdir: Path) -> None:
    code = ("import sys\nfrom bsplan.cli.app import main\nsys.argv = ['bsplan', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    print('matplotlib loaded:', 'matplotlib' in sys.modules, file=sys.stderr)\n")
    for args in (["--help"], ["probe", "--help"], ["plan", "--target", "64", "--max-micro", "8"]):
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=workdir, timeout=60)
        assert done.stderr.strip().endswith("matplotlib loaded: False"), (args, done.stderr)


@pytest.mark.slow
def test_estimate_on_a_b200(workdir: Path) -> None:
    run = bsplan("estimate", str(EXAMPLES / "cnn.py"), "--gpu", "B200", "--json", cwd=workdir)
    assert run.code == 0, run.stderr
    data = run.json()
    assert data["device"]["name"].startswith("B200-180GB") and data["device"]["total_bytes"] == 183359 * MIB
    assert data["max_batch"] > 0


# --- the catalogue's 2026 GPUs -------------------------------------------------------------------


def test_every_new_gpu_has_memory_compute_bandwidth_and_a_source() -> None:
    rows = {line.split("|")[1].strip(" `"): line for line in (ROOT / "docs" / "gpus.md").read_text().splitlines()
            if line.startswith("| `")}
    for key in NEW_GPUS:
        gpu = next(gpu for gpu in CATALOG if gpu.key == key)
        assert gpu.memory_bytes > 30 * GIB and gpu.bandwidth_gb_per_s > 1000 and gpu.bf16_tflops, key
        assert "[D" in rows[key] or "[S" in rows[key], key  # a datasheet or a quoted source in its row


@pytest.mark.parametrize(("name", "key"), [
    ("b200", "B200-180GB"), ("gb200", "GB200-186GB"), ("NVIDIA GB200", "GB200-186GB"), ("B300", "B300-288GB"),
    ("h20", "H20-96GB"), ("h200 nvl", "H200-NVL-141GB"), ("h200", "H200-SXM-141GB"), ("5090", "RTX-5090-32GB"),
    ("rtx pro 6000", "RTX-PRO-6000-96GB"), ("mi300x", "MI300X-192GB"), ("MI325X", "MI325X-256GB"), ("mi355x", "MI355X-288GB"),
])
def test_new_gpus_match_loosely(name: str, key: str) -> None:
    assert find_gpu(name).key == key


def test_a_name_still_ambiguous_is_refused() -> None:
    with pytest.raises(BadInput, match="fits several GPUs with different memory"):
        find_gpu("6000")  # RTX A6000 (48 GB) or RTX PRO 6000 (96 GB)


# --- ROCm builds of torch ------------------------------------------------------------------------


def _amd_cuda() -> SimpleNamespace:
    return SimpleNamespace(get_device_properties=lambda index: SimpleNamespace(name="AMD Instinct MI300X", total_memory=192 * GIB))


def test_a_rocm_build_names_the_device_as_rocm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.2.41133-dd7f95766")
    assert CudaDevice(0, None, _amd_cuda()).info.name == "cuda:0 (AMD Instinct MI300X, ROCm 6.2.41133-dd7f95766)"
    monkeypatch.setattr(torch.version, "hip", None)
    assert CudaDevice(0, None, _amd_cuda()).info.name == "cuda:0 (AMD Instinct MI300X)"


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 - pynvml's name
    pass


def _no_driver() -> SimpleNamespace:
    def init() -> None:
        raise NVMLError_LibraryNotFound()
    return SimpleNamespace(NVMLError=NVMLError, nvmlInit=init)


def test_gpus_on_a_rocm_build_says_nvml_does_not_list_amd_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    why = nvml.query({}, _no_driver()).unavailable  # type: ignore[arg-type]
    assert why is not None and "\n" not in why
    assert why.startswith("no NVIDIA driver here") and "ROCm build (HIP 6.2.41133)" in why and "rocm-smi" in why
    monkeypatch.setattr(torch.version, "hip", None)
    assert "ROCm" not in nvml.query({}, _no_driver()).unavailable  # type: ignore[arg-type, operator]


def test_the_hip_version_is_read_without_importing_torch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('bsplan gpus must not import torch')\n")
    (fake / "version.py").write_text("from typing import Optional\ncuda: Optional[str] = None\nhip: Optional[str] = '6.4.43482'\n")
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert nvml.torch_hip_version() == "6.4.43482"
    (fake / "version.py").write_text("hip: Optional[str] = None\n")
    assert nvml.torch_hip_version() is None
