"""FID plumbing without Inception: a tiny deterministic conv net stands in for clean-fid's network.

Nothing here needs the real Inception weights or the internet: the offline tests point clean-fid's
download at a refused (or misbehaving) port on 127.0.0.1 and its weights folder at a temporary one.
"""
import socket
import socketserver
import threading

import numpy as np
import pytest
import scipy.linalg
import torch
from cleanfid import downloads_helper
from cleanfid import features as cf_features
from cleanfid.fid import get_folder_features, kernel_distance
from cleanfid.inception_torchscript import InceptionV3W
from PIL import Image
from torchvision.utils import save_image

from evaluation import distances as feature_distances
from evaluation import fid
from runtime.errors import UserError

WEIGHTS = "inception-2015-12-05.pt"


class PooledFeatures(torch.nn.Module):
    """Stands in for Inception: 32 deterministic features of float images [B, 3, H, W] in [0, 255]
    (8 channels pooled over a 2 x 2 grid: more features than helpers.TinyFeatures, for the statistics tests)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.1)
            self.conv.bias.zero_()

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x / 255 - 0.5)), 2).flatten(1)


def random_images(n, size, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def independent_fid(f1, f2):
    """Float64 FID from features by the eigen-decomposition of sigma1^(1/2) sigma2 sigma1^(1/2)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.maximum(w, 0))) @ v.T
    tr = np.sqrt(np.maximum(np.linalg.eigvalsh(root1 @ s2 @ root1), 0)).sum()
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr


def make_evaluator(tmp_path, *, real, key="data1", num_samples=10, batch_size=4, calls=None, **kw):
    def real_batches():
        if calls is not None:
            calls.append(1)
        for start in range(0, len(real), 16):
            yield real[start:start + 16]
    extractor = fid.FeatureExtractor(model=PooledFeatures(), batch_size=8)
    return fid.FIDEvaluator(real_key=key, image_size=real.shape[-1], real_batches=real_batches,
                            num_samples=num_samples, cache_dir=tmp_path / "cache", extractor=extractor,
                            batch_size=batch_size, **kw)


# ------------------------------------------------------------------------------------------------
# quantize_uint8


def test_quantize_matches_png_round_trip(tmp_path):
    edges = torch.tensor([(k + 0.5) / 255 for k in range(0, 255, 17)] + [-0.3, 0.0, 1.0, 1.7, 0.4999 / 255])
    images = torch.rand(3, 3, 8, 8)
    images.view(-1)[:len(edges)] = edges
    before = images.clone()
    quantized = fid.quantize_uint8(images)
    assert torch.equal(images, before)  # the caller's tensor is left alone
    assert quantized.dtype == torch.uint8 and quantized.device.type == "cpu"
    for i, image in enumerate(images):
        save_image(image, tmp_path / f"{i}.png")
        png = np.asarray(Image.open(tmp_path / f"{i}.png").convert("RGB"))
        np.testing.assert_array_equal(quantized[i].permute(1, 2, 0).numpy(), png)


def test_quantize_nan_and_bad_input():
    images = torch.full((1, 3, 2, 2), float("nan"))
    assert fid.quantize_uint8(images).eq(0).all()
    with pytest.raises(ValueError):
        fid.quantize_uint8(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError):
        fid.quantize_uint8(torch.zeros(3, 2, 2))


# ------------------------------------------------------------------------------------------------
# frechet_distance


def test_frechet_matches_independent_computations():
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24))
    f2 = rng.normal(size=(250, 24)) * 1.5 + 0.3
    mu1, s1, mu2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    ours = feature_distances.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(independent_fid(f1, f2), rel=1e-9)
    reference_way = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert ours == pytest.approx(reference_way, rel=1e-8)
    assert feature_distances.frechet_distance(mu1, s1, mu2, s2, sqrt_sigma2=feature_distances.sqrt_psd(s2)) == pytest.approx(ours, rel=1e-12)


def test_frechet_singular_covariances():
    """Fewer samples than dimensions (as with 1,000 samples of 2,048 Inception features) stays exact."""
    rng = np.random.default_rng(1)
    f1, f2 = rng.random((20, 64)), rng.random((30, 64)) + 0.05
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    tr = np.sqrt(np.maximum(np.linalg.eigvals(s1 @ s2).real, 0)).sum()  # another independent route
    expected = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    ours = feature_distances.frechet_distance(f1.mean(0), s1, f2.mean(0), s2)
    assert np.isfinite(ours) and ours == pytest.approx(expected, rel=1e-6)
    assert ours == pytest.approx(independent_fid(f1, f2), rel=1e-6)


def test_frechet_identical_and_mean_shift():
    rng = np.random.default_rng(2)
    f = rng.random((100, 16))
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    assert abs(feature_distances.frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)
    shift = np.arange(16) * 0.01
    assert feature_distances.frechet_distance(mu + shift, sigma, mu, sigma) == pytest.approx((shift ** 2).sum(), rel=1e-6)


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes"):
        feature_distances.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="finite"):
        feature_distances.frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------------------------------
# kernel_inception_distance


def naive_mmd2(x, y):
    """The unbiased polynomial-kernel MMD^2 over the whole sets, written out with loops over pairs."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2 * xy / m ** 2


def test_kid_matches_naive_and_clean_fid_on_whole_sets():
    rng = np.random.default_rng(3)
    x, y = rng.random((40, 8)), rng.random((40, 8)) + 0.2
    ours = feature_distances.kernel_inception_distance(x, y, num_subsets=3, subset_size=1000)  # m = 40: every subset is all
    assert ours == pytest.approx(naive_mmd2(x, y), rel=1e-10)
    assert ours == pytest.approx(kernel_distance(x, y, num_subsets=2, max_subset_size=1000), rel=1e-10)


def test_kid_gram_and_subset_paths_agree():
    rng = np.random.default_rng(4)
    x, y = torch.tensor(rng.random((60, 8))), torch.tensor(rng.random((90, 8)))
    draws = [np.stack([rng.choice(n, 25, replace=False) for _ in range(7)]) for n in (60, 90)]
    for a, b in zip(feature_distances._kid_sums_gram(x, y, draws), feature_distances._kid_sums_subsets(x, y, draws)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    xx, yy, xy = feature_distances._kid_sums_gram(x, y, draws)
    a, b = x[draws[0][2]].numpy(), y[draws[1][2]].numpy()
    assert xy[2].item() == pytest.approx(sum((u @ v / 8 + 1) ** 3 for u in a for v in b), rel=1e-12)
    assert xx[2].item() == pytest.approx(sum((a[i] @ a[j] / 8 + 1) ** 3 for i in range(25) for j in range(25)
                                             if i != j), rel=1e-12)


def test_kid_large_sets_take_subset_path_with_the_same_value(monkeypatch):
    rng = np.random.default_rng(5)
    x, y = rng.random((400, 4)), rng.random((300, 4))
    small = feature_distances.kernel_inception_distance(x, y, num_subsets=2, subset_size=10)  # n^2 >> S m^2: subset path
    monkeypatch.setattr(feature_distances, "_kid_sums_subsets", feature_distances._kid_sums_gram)
    assert feature_distances.kernel_inception_distance(x, y, num_subsets=2, subset_size=10) == pytest.approx(small, rel=1e-10)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_reproducible():
    rng = np.random.default_rng(6)
    x, y, z = rng.random((300, 16)), rng.random((300, 16)), rng.random((300, 16)) + 0.1
    same = feature_distances.kernel_inception_distance(x, y, num_subsets=20, subset_size=200)
    different = feature_distances.kernel_inception_distance(x, z, num_subsets=20, subset_size=200)
    assert different > 0.05 and abs(same) < 0.02 * different
    assert feature_distances.kernel_inception_distance(x, z, num_subsets=20, subset_size=200) == different
    assert feature_distances.kernel_inception_distance(x[:5], z, num_subsets=2) == pytest.approx(  # subset_size capped at 5
        feature_distances.kernel_inception_distance(x[:5], z, num_subsets=2, subset_size=5))
    with pytest.raises(ValueError):
        feature_distances.kernel_inception_distance(x[:1], z)


# ------------------------------------------------------------------------------------------------
# FeatureExtractor


@pytest.mark.parametrize("mode", fid.MODES)
def test_extractor_matches_clean_fid_folder_path(tmp_path, mode):
    """Our in-memory path gives clean-fid's features of PNGs holding the same uint8 images."""
    images = random_images(6, 20, seed=7)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:03d}.png")
    model = PooledFeatures()
    theirs = get_folder_features(str(tmp_path), model=model, num_workers=0, batch_size=6,
                                 device=torch.device("cpu"), mode=mode, verbose=False)
    ours = fid.FeatureExtractor(mode=mode, model=model, batch_size=6)(images)
    assert ours.shape == (6, 32)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_extractor_batches_and_input_checks():
    images = random_images(7, 12, seed=8)
    whole = fid.FeatureExtractor(model=PooledFeatures(), batch_size=7, num_threads=1)(images)
    pieces = fid.FeatureExtractor(model=PooledFeatures(), batch_size=3)(images)
    np.testing.assert_allclose(whole, pieces, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        fid.FeatureExtractor(model=PooledFeatures())(images.float())
    with pytest.raises(UserError, match="--fid_mode"):
        fid.FeatureExtractor(mode="fancy")


def test_extractor_hands_the_network_channels_last_batches_on_cpu():
    seen = []

    class Recording(PooledFeatures):
        def forward(self, x):
            seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            return super().forward(x)

    class Contiguous(PooledFeatures):
        def forward(self, x):
            return super().forward(x.contiguous())

    images = random_images(5, 12, seed=9)
    nhwc = fid.FeatureExtractor(model=Recording(), batch_size=2)(images)
    assert seen == [True, True, True]  # batches of 2, 2 and 1
    nchw = fid.FeatureExtractor(model=Contiguous(), batch_size=2)(images)
    np.testing.assert_allclose(nhwc, nchw, rtol=1e-5, atol=1e-6)  # the layout changes the speed, not the features


# ------------------------------------------------------------------------------------------------
# FIDEvaluator: reference cache


def test_reference_is_cached_reused_and_rebuilt_for_other_data_or_size(tmp_path):
    real, calls = random_images(40, 16, seed=9), []
    stats = make_evaluator(tmp_path, real=real, calls=calls).reference()
    path = tmp_path / "cache" / "fid_ref_clean_16px_data1.npz"
    assert path.exists() and len(calls) == 1
    features = fid.FeatureExtractor(model=PooledFeatures())(real)
    np.testing.assert_allclose(stats.features, features, rtol=1e-6)
    np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-9)

    again = make_evaluator(tmp_path, real=real, calls=calls)
    np.testing.assert_array_equal(again.reference().sigma, stats.sigma)
    again.reference()
    assert len(calls) == 1  # loaded from disk, then kept in memory

    make_evaluator(tmp_path, real=random_images(40, 16, seed=10), key="data2", calls=calls).reference()
    make_evaluator(tmp_path, real=random_images(40, 24, seed=9), calls=calls).reference()
    assert len(calls) == 3
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "fid_ref_clean_16px_data1.npz", "fid_ref_clean_16px_data2.npz", "fid_ref_clean_24px_data1.npz"]


def test_unusable_cache_is_rebuilt_with_a_warning(tmp_path):
    real, calls = random_images(30, 16, seed=11), []
    stats = make_evaluator(tmp_path, real=real, calls=calls).reference()
    path = tmp_path / "cache" / "fid_ref_clean_16px_data1.npz"
    path.write_bytes(path.read_bytes()[:1000])  # truncated, as by a killed run without atomic writes
    with pytest.warns(RuntimeWarning, match="unusable"):
        rebuilt = make_evaluator(tmp_path, real=real, calls=calls).reference()
    np.testing.assert_array_equal(rebuilt.mu, stats.mu)
    assert len(calls) == 2 and make_evaluator(tmp_path, real=real, calls=calls).reference() is not None
    assert len(calls) == 2  # the rebuilt file is whole again

    class OtherNet(PooledFeatures):
        pass
    other = fid.FIDEvaluator(real_key="data1", image_size=16, real_batches=lambda: [real], cache_dir=tmp_path / "cache",
                             extractor=fid.FeatureExtractor(model=OtherNet()))
    with pytest.warns(RuntimeWarning, match="made for"):
        other.reference()


def test_cache_write_is_atomic_and_a_failed_write_only_warns(tmp_path, monkeypatch):
    real = random_images(20, 16, seed=12)
    monkeypatch.setattr(fid.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.warns(RuntimeWarning, match="could not cache"):
        stats = make_evaluator(tmp_path, real=real).reference()
    assert stats.features.shape == (20, 32)
    assert list((tmp_path / "cache").iterdir()) == []  # neither the file nor a temporary left behind
    monkeypatch.undo()
    make_evaluator(tmp_path, real=real).reference()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fid_ref_clean_16px_data1.npz"]


def test_evaluator_input_checks(tmp_path):
    real = random_images(8, 16)
    with pytest.raises(UserError, match="--fid_samples"):
        make_evaluator(tmp_path, real=real, num_samples=1)
    with pytest.raises(ValueError, match="real_key"):
        make_evaluator(tmp_path, real=real, key="../x")
    with pytest.raises(ValueError, match="uint8"):
        make_evaluator(tmp_path, real=real.float()).reference()
    with pytest.raises(ValueError, match="sample_fn"):
        make_evaluator(tmp_path, real=real).evaluate(lambda n, labels: torch.rand(n, 3, 8, 8))


# ------------------------------------------------------------------------------------------------
# FIDEvaluator: evaluate


def test_evaluate_chunks_quantizes_and_matches_independent_fid(tmp_path, monkeypatch):
    real = random_images(40, 16, seed=13)
    evaluator = make_evaluator(tmp_path, real=real, num_samples=10, batch_size=4)
    evaluator.reference()
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: pytest.fail("evaluate wrote an image file"))
    samples, sizes = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(14)), []

    def sample_fn(n, labels):
        assert labels is None  # an unconditional score asks for no class
        sizes.append(n)
        start = sum(sizes[:-1])
        return samples[start:start + n]
    result = evaluator.evaluate(sample_fn)
    assert sizes == [4, 4, 2] and set(result) == {"fid", "kid", "fid_samples", "seconds"}
    assert result["fid_samples"] == 10 and result["seconds"] >= 0
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before  # no file touched

    extractor = fid.FeatureExtractor(model=PooledFeatures())
    gen = extractor((samples * 255 + 0.5).clamp(0, 255).to(torch.uint8))
    real_feats = extractor(real).astype(np.float32).astype(np.float64)
    assert result["fid"] == pytest.approx(independent_fid(gen, real_feats), rel=1e-6)
    assert result["kid"] == pytest.approx(feature_distances.kernel_inception_distance(gen, real_feats), rel=1e-6)


def test_evaluate_identical_sets_gives_zero_fid(tmp_path):
    real = random_images(24, 16, seed=15)
    evaluator = make_evaluator(tmp_path, real=real, num_samples=24, batch_size=8)
    batches = iter(real.float().div(255).split(8))
    result = evaluator.evaluate(lambda n, labels: next(batches))
    trace = np.trace(evaluator.reference().sigma)
    assert abs(result["fid"]) < 1e-6 * trace
    shifted = make_evaluator(tmp_path, real=real, num_samples=24, batch_size=24)
    assert shifted.evaluate(lambda n, labels: (real.float() / 255 * 0.5)[:n])["fid"] > 1e-3 * trace


# ------------------------------------------------------------------------------------------------
# Offline: clean-fid cannot download its Inception weights


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    """clean-fid's Inception loads from (and downloads to) a temporary folder instead of /tmp."""
    folder = tmp_path / "weights"
    folder.mkdir()
    builds = []

    def inception(path, download=True, resize_inside=False):
        builds.append(path)
        return InceptionV3W(str(folder), download=download, resize_inside=resize_inside)
    monkeypatch.setattr(cf_features, "InceptionV3W", inception)
    monkeypatch.setattr(fid, "weights_location", lambda mode: (str(folder / WEIGHTS), downloads_helper.inception_url))
    return folder, builds


def refused_url(monkeypatch):
    with socket.socket() as s:  # a port that was free a moment ago: connecting is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{WEIGHTS}"
    monkeypatch.setattr(downloads_helper, "inception_url", url)
    return url


def test_weights_location_is_where_clean_fid_looks():
    path, url = fid.weights_location("clean")
    assert path == f"/tmp/{WEIGHTS}" and url == downloads_helper.inception_url and url.startswith("https://")
    assert fid.weights_location("legacy_pytorch")[0].startswith(torch.hub.get_dir())


def test_failed_download_raises_one_line_user_error(tmp_path, monkeypatch, weights_dir):
    folder, _ = weights_dir
    url = refused_url(monkeypatch)
    evaluator = fid.FIDEvaluator(real_key="k", image_size=16, cache_dir=tmp_path / "cache",
                                 real_batches=lambda: pytest.fail("read the data before checking for the network"))
    with pytest.raises(fid.InceptionUnavailable) as caught:
        evaluator.reference()  # checks the network first, so that main.py can warn before training starts
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in message
    assert "could not be downloaded" in message and url in message
    assert str(folder / WEIGHTS) in message and "--fid" in message
    assert list(folder.iterdir()) == []


def test_partial_download_is_removed(tmp_path, monkeypatch, weights_dir):
    folder, _ = weights_dir

    class Truncating(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.recv(65536)
            self.request.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)

    with socketserver.TCPServer(("127.0.0.1", 0), Truncating) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setattr(downloads_helper, "inception_url", f"http://127.0.0.1:{server.server_address[1]}/w.pt")
        try:
            with pytest.raises(fid.InceptionUnavailable, match="could not be downloaded"):
                fid.FeatureExtractor().load()
        finally:
            server.shutdown()
    assert not (folder / WEIGHTS).exists()


def test_corrupt_weights_file_says_to_delete_it(monkeypatch, weights_dir):
    folder, _ = weights_dir
    (folder / WEIGHTS).write_bytes(b"<html>not a network</html>")
    with pytest.raises(fid.InceptionUnavailable, match="could not be loaded.*delete that file"):
        fid.FeatureExtractor().load()
    assert (folder / WEIGHTS).exists()  # not ours to delete


def test_offline_training_warns_once_and_goes_on(tmp_path, monkeypatch, weights_dir):
    _, builds = weights_dir
    refused_url(monkeypatch)
    evaluator = fid.FIDEvaluator(real_key="k", image_size=16, real_batches=lambda: [random_images(4, 16)],
                                 cache_dir=tmp_path / "cache", num_samples=4)
    steps, results = 0, []
    with pytest.warns(RuntimeWarning, match="training goes on") as record:
        for step in range(1, 7):  # a stand-in training loop scoring every 2 steps
            steps += 1
            if step % 2 == 0:
                results.append(evaluator.evaluate_or_warn(lambda n, labels: pytest.fail("sampled without a network")))
    assert steps == 6 and results == [None, None, None]
    assert len([w for w in record if "FID" in str(w.message)]) == 1 and len(builds) == 1
