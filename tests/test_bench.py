"""`openldm bench` on a tiny model: every stage reported, and the stages consistent with each other.

Times are never asserted; only how they relate (a total holds its parts, a median lies in its range).
"""

from __future__ import annotations

import json

import pytest
from helpers import make_checkpoint

from openldm.cli import main
from openldm.config import TINY_SD1
from openldm.memory import estimate_peak

STEPS = 3


@pytest.fixture(scope="module")
def report(tmp_path_factory, one_thread):
    import contextlib
    import io

    model = make_checkpoint(tmp_path_factory.mktemp("bench"), "tiny-sd1")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", str(model), "--steps", str(STEPS), "--size", "32", "--rounds", "1",
                     "--compare", "diffusers", "--json"])
    assert code == 0
    return json.loads(out.getvalue())


def test_each_run_reports_consistent_stages(report):
    assert [r["tool"] for r in report["runs"]] == ["openldm (eager)", "diffusers"]
    for run in report["runs"]:
        assert run["unet_calls"] == STEPS, f"{run['tool']}: CFG should be one batched UNet call per step"
        assert run["unet_step_min_s"] <= run["unet_step_median_s"] <= run["unet_step_max_s"]
        inside = run["unet_calls"] * run["unet_step_min_s"] + run["vae_decode_s"]
        assert run["generate_s"] >= inside, f"{run['tool']}: generation shorter than its steps and decode"
        assert run["total_s"] >= run["load_s"] + run["generate_s"] + run["png_write_s"] - 1e-9
        assert run["it_per_s"] <= 1 / run["unet_step_min_s"] + 1e-9
        fraction = run["unet_gflop_per_s"] / run["roofline_gflop_per_s"]
        assert 0 < run["roofline_fraction"] == pytest.approx(fraction)
        assert run["peak_rss_gib"] > 0
        assert run["peak_vram_gib"] is None, "peak VRAM is a CUDA figure; this run was on the CPU"
    assert (report["device"], report["dtype"]) == ("cpu", "float32")  # render.device_and_dtype's defaults
    ours, theirs = report["runs"]
    assert ours["total_s"] >= report["imports_s"] + ours["load_s"], "the first run's total counts the imports"
    assert ours["unet_gflop_per_call"] == theirs["unet_gflop_per_call"] > 0  # one count, the same UNet
    # The estimate beside the measured peak is the one a run is admitted by (`openldm.memory`).
    expected = estimate_peak(TINY_SD1, width=32, height=32).total / 2**30
    assert ours["estimated_peak_gib"] == pytest.approx(expected) and theirs["estimated_peak_gib"] is None
    ratio = theirs["unet_step_median_s"] / ours["unet_step_median_s"]
    assert report["ratios"]["diffusers"]["unet_step_median_s"] == pytest.approx(ratio)


def test_bad_settings_are_one_line(capsys, tmp_path):
    model = make_checkpoint(tmp_path, "tiny-sd1")
    assert main(["bench", str(model), "--steps", "0"]) == 2
    want = "openldm bench: error: --steps, --batch, --rounds and --threads must be at least 1"
    assert capsys.readouterr().err.strip() == want
    assert main(["bench", str(model), "--sampler", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openldm bench: error:") and "nope" in err and "\n" not in err


@pytest.mark.parametrize(("device", "dtype", "message"), [
    ("nope", None, "unknown device 'nope'; cpu, cuda, cuda:N or mps"),
    ("cuda:99", None, "device 'cuda:99' is not available on this machine"),
    ("cpu", "fp16", "--dtype fp16 does not run on the CPU; use fp32"),
])
def test_a_device_that_cannot_run_is_one_line_before_loading(capsys, tmp_path, device, dtype, message):
    missing = tmp_path / "absent.safetensors"  # never read: the device is refused first
    argv = ["bench", str(missing), "--device", device] + (["--dtype", dtype] if dtype else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"openldm bench: error: {message}") and "\n" not in err, err
