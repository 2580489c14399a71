"""The loader benchmark's figures are consistent: pil is its own reference, a copy that needed no resizing
is pil to the pixel, the nvjpeg path's arithmetic stays within rounding, ratios match the rates.

Timings are not asserted (they go to docs/BENCHMARKS.md).
"""

import json

import pytest

TINY = ["--generate", "96x72", "--images", "4", "--size", "32", "--repeats", "1"]


@pytest.fixture(scope="module")
def loader_figures(benchmark_tools, tmp_path_factory, random_checkpoint):
    out = tmp_path_factory.mktemp("loader")
    figures = {}
    for name, extra in (("copied", []), ("shrunk", ["--short-side", "40"])):
        benchmark_tools.cli.main(["loader", *TINY, *extra, "--weights", random_checkpoint(3, 16),
                                  "--json", str(out / f"{name}.json")])
        figures[name] = json.loads((out / f"{name}.json").read_text())
    return figures


def test_pil_is_the_reference_and_ratios_match_the_rates(loader_figures):
    folder = loader_figures["copied"]["folders"][0]
    assert folder["image_size"] == "96x72" and folder["images"] == 4
    modes = folder["modes"]
    assert set(modes) >= {"pil", "pil_draft", "nvjpeg_cpu", "preresized"}
    assert modes["pil"]["pixel_mad"] == 0.0 and modes["pil"]["cosine_min"] == pytest.approx(1.0, abs=1e-5)
    for row in modes.values():
        if "img_s_per_core" in row:
            ratio = row["img_s_per_core"] / modes["pil"]["img_s_per_core"]
            assert row["vs_pil"] == pytest.approx(ratio, abs=0.011)


def test_a_copy_below_the_short_side_is_pil_to_the_pixel(loader_figures):
    """96x72 images are below a 256 short side: copied byte for byte, so the same pixels and embeddings."""
    copied = loader_figures["copied"]["folders"][0]
    assert copied["preresized_kbytes_per_image"] == copied["kbytes_per_image"]
    assert copied["modes"]["preresized"]["pixel_mad"] == 0.0
    shrunk = loader_figures["shrunk"]["folders"][0]  # short side 40: resized, smaller files, other pixels
    assert shrunk["preresized_kbytes_per_image"] < shrunk["kbytes_per_image"]
    assert shrunk["modes"]["preresized"]["pixel_mad"] > 0.0


def test_fidelity_of_the_shortcuts_is_bounded(loader_figures):
    modes = loader_figures["copied"]["folders"][0]["modes"]
    assert modes["nvjpeg_cpu"]["pixel_mad"] < 0.5  # antialiased bilinear and rounding: PIL's arithmetic
    assert modes["nvjpeg_cpu"]["cosine_min"] > 0.99
    for mode in ("pil_draft", "nvjpeg_cpu"):
        assert 0.0 < modes[mode]["cosine_mean"] <= 1.0 + 1e-6 and modes[mode]["cosine_min"] <= modes[mode]["cosine_mean"]


def test_no_images_is_one_line(benchmark_tools, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark_tools.cli.main(["loader"])
    assert exc.value.code == 2 and capsys.readouterr().err.strip() == \
        "error: loader: give --generate WxH[,WxH] and/or --data ROOT"


def test_nvjpeg_workers_only_read_and_the_copy_reports_its_rate(loader_figures):
    folder = loader_figures["shrunk"]["folders"][0]
    read = folder["modes"]["nvjpeg_read"]
    assert set(read) == {"img_s_per_core", "vs_pil"} and read["img_s_per_core"] > 0  # no pixels, no fidelity
    assert folder["preresize_img_s_per_core"] > 0


def test_pink_noise_has_a_one_over_f_spectrum_and_is_measured_beside(benchmark_tools, tmp_path):
    """Radially averaged amplitude of the written noise falls as 1/f (log-log slope near -1, JPEG's loss
    aside), and --pink adds one folder per size."""
    import numpy as np
    from PIL import Image

    loader = benchmark_tools.suite("loader")
    (path,) = loader.write_pink_noise(tmp_path, (256, 192), 1)
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    amp = np.abs(np.fft.rfft2(grey - grey.mean()))
    f = np.sqrt(np.fft.fftfreq(192)[:, None] ** 2 + np.fft.rfftfreq(256)[None, :] ** 2)
    bands = np.logspace(np.log10(0.01), np.log10(0.2), 8)
    mean_amp = [amp[(f >= lo) & (f < hi)].mean() for lo, hi in zip(bands[:-1], bands[1:])]
    centres = np.sqrt(bands[:-1] * bands[1:])
    slope = np.polyfit(np.log(centres), np.log(mean_amp), 1)[0]
    assert -1.3 < slope < -0.7, slope
    out = tmp_path / "pink.json"
    benchmark_tools.cli.main(["loader", "--generate", "96x72", "--images", "2", "--size", "16", "--repeats", "1",
                              "--pink", "--json", str(out)])
    import json
    roots = [f["root"] for f in json.loads(out.read_text())["folders"]]
    assert roots == ["2 generated photographs", "2 pink-noise JPEGs"]
