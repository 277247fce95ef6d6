"""The page (``--serve``): a real server from ``python main.py --serve`` on a tiny checkpoint, driven through its
API with ``gradio_client``: sample, inpaint and redraw (sizes, channels, kept pixels, the seed's determinism),
two requests at once, a cancel that frees the queue, and every refusal, after which the server still serves.
The controls a model takes (classes, grey images) are checked on pages built in the test's own process."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import free_port, start_page, tiny_run

gradio_client = pytest.importorskip("gradio_client", reason="the page's extra: pip install -r requirements-page.txt")
from gradio_client import Client, handle_file  # noqa: E402

SIZE, T = 16, 10  # the tiny run's image size and timesteps
pytestmark = pytest.mark.xdist_group("page")  # one worker runs the module, and starts its page once


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    data, _, run = tiny_run(root, 2)
    save = root / "out"
    process, url = start_page(run / "model.pt", save)
    try:
        yield {"url": url, "save": save, "data": data, "root": root, "load_path": run / "model.pt"}
    finally:
        process.terminate()
        process.wait(timeout=30)


def picture(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def squares(root: Path) -> tuple[Path, Path, np.ndarray]:
    """A model-size input image, a layer painted over its centre (8 x 8 of 16 x 16), and the kept pixels' mask."""
    rng = np.random.default_rng(1)
    image = picture(root / "input.png", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    layer = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    layer[4:12, 4:12] = (255, 0, 255, 255)
    keep = np.ones((SIZE, SIZE), dtype=bool)
    keep[4:12, 4:12] = False
    return image, picture(root / "layer.png", layer), keep


def editor(image: Path, *layers: Path) -> dict:
    return {"background": handle_file(str(image)), "layers": [handle_file(str(p)) for p in layers], "composite": None}


def pixels(item) -> np.ndarray:
    path = item["image"] if isinstance(item, dict) else item
    return np.asarray(Image.open(path))


def test_sample_gives_the_asked_images_and_the_same_seed_the_same_images(page):
    client = Client(page["url"], verbose=False)
    grid, singles = client.predict(4, 3, "ancestral", 5, "(no class)", 1.0, api_name="/sample")
    again = client.predict(4, 3, "ancestral", 5, "(no class)", 1.0, api_name="/sample")[1]
    other = client.predict(4, 4, "ancestral", 5, "(no class)", 1.0, api_name="/sample")[1]
    assert len(singles) == 4 and all(pixels(s).shape == (SIZE, SIZE, 3) for s in singles)
    assert Image.open(grid).size == (2 * SIZE + 3 * 2, 2 * SIZE + 3 * 2)  # 2 x 2 with 2-pixel gaps
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(singles, again))
    assert not np.array_equal(pixels(singles[0]), pixels(other[0]))
    written = sorted(p.name for p in (page["save"] / "page").glob("sample-*.png"))
    assert len(written) == 3 * 5  # each request: a grid and its four images, under the save folder


@pytest.mark.parametrize("candidates", [1, 3])
def test_inpaint_keeps_the_unpainted_pixels_exactly_and_fills_the_painted_ones(page, tmp_path, candidates):
    image, layer, keep = squares(tmp_path)
    client = Client(page["url"], verbose=False)
    grid, results = client.predict(editor(image, layer), 3, 0, 2, candidates, "ancestral", 5, "(no class)", 1.0,
                                   api_name="/inpaint")
    source = np.asarray(Image.open(image))
    assert len(results) == 3
    for result in results:
        out = pixels(result)
        assert np.array_equal(out[keep], source[keep])
        assert (out[~keep] != source[~keep]).any(axis=-1).mean() > 0.9
    assert Image.open(grid).size == (5 * SIZE + 6 * 2, SIZE + 2 * 2)  # the input, the hole, three results


def test_a_mask_painted_on_a_larger_upload_is_cropped_and_resized_with_it(page, tmp_path):
    """A 48 x 32 upload: the centre square is cut out and resized to 16 px, and so is the painted region."""
    big = picture(tmp_path / "big.png", np.full((32, 48, 3), 200, dtype=np.uint8))
    layer = np.zeros((32, 48, 4), dtype=np.uint8)
    layer[:, :24, 3] = 255  # the left half of the upload: the left half of its centre square, cols 8-23 of 8-39
    result = Client(page["url"], verbose=False).predict(editor(big, picture(tmp_path / "half.png", layer)), 1, 0, 1,
                                                        1, "ancestral", 3, "(no class)", 1.0, api_name="/inpaint")[1][0]
    out = pixels(result)
    assert (out[:, SIZE // 2 + 1:] == 200).all()  # the right half kept (one column of resizing margin)
    assert (out[:, :SIZE // 2 - 1] != 200).any(axis=-1).mean() > 0.9


def test_redraw_at_strength_zero_returns_the_image_and_at_one_draws_anew(page, tmp_path):
    image, _, _ = squares(tmp_path)
    client = Client(page["url"], verbose=False)
    source = np.asarray(Image.open(image))
    same = client.predict(handle_file(str(image)), 0.0, 2, 0, "ddim", 4, "(no class)", 1.0, api_name="/redraw")[1]
    new = client.predict(handle_file(str(image)), 1.0, 2, 0, "ddim", 4, "(no class)", 1.0, api_name="/redraw")[1]
    assert all(np.array_equal(pixels(r), source) for r in same)
    assert all(pixels(r).shape == source.shape and not np.array_equal(pixels(r), source) for r in new)


REFUSALS = {  # name: (endpoint, arguments given the test's files, what the page says)
    "empty mask": ("/inpaint", lambda f: (editor(f["image"]), 1, 0, 1, 1, "ancestral", 3, "", 1.0),
                   "the mask is empty"),
    "mask over everything": ("/inpaint", lambda f: (editor(f["image"], f["full"]), 1, 0, 1, 1, "ancestral", 3, "",
                                                        1.0), "covers the whole image"),
    "more fills than a chain holds": ("/inpaint", lambda f: (editor(f["image"]), 8, 0, 1, 9, "ancestral", 3, "", 1.0),
                                      "fills to choose from must be a whole number from 1 to 8 for 8 results"),
    "two fills to choose from": ("/inpaint", lambda f: (editor(f["image"]), 1, 0, 1, 2, "ancestral", 3, "", 1.0),
                                 "two fills have no majority"),
    "no image": ("/redraw", lambda f: (None, 0.5, 1, 0, "ancestral", 3, "", 1.0), "no image"),
    "not an image": ("/redraw", lambda f: (handle_file(str(f["text"])), 0.5, 1, 0, "ancestral", 3, "", 1.0),
                     "cannot be read as an image"),
    "too small": ("/redraw", lambda f: (handle_file(str(f["tiny"])), 0.5, 1, 0, "ancestral", 3, "", 1.0),
                  "too small"),
    "a class the model does not know": ("/sample", lambda f: (1, 0, "ancestral", 3, "dog", 1.0), "unconditional"),
    "steps DDPM cannot take": ("/sample", lambda f: (1, 0, "ddpm", 5, "", 1.0), "visits every one of the T = 10"),
    "more steps than T": ("/sample", lambda f: (1, 0, "ddim", 11, "", 1.0), "greater than maximum value 10"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_is_refused_in_the_page_and_the_server_goes_on(page, tmp_path, case):
    image, _, _ = squares(tmp_path)
    full = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    full[..., 3] = 255
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    files = {"image": image, "full": picture(tmp_path / "full.png", full), "text": text,
             "tiny": picture(tmp_path / "tiny.png", np.zeros((4, 4, 3), dtype=np.uint8))}
    endpoint, arguments, message = REFUSALS[case]
    before = {p for p in page["root"].rglob("*") if p.is_file() and page["save"] not in p.parents}
    client = Client(page["url"], verbose=False)
    with pytest.raises(Exception, match=message):
        client.predict(*arguments(files), api_name=endpoint)
    assert len(client.predict(1, 0, "ancestral", 2, "", 1.0, api_name="/sample")[1]) == 1  # still serving
    after = {p for p in page["root"].rglob("*") if p.is_file() and page["save"] not in p.parents}
    assert after == before  # nothing written outside the save folder


def test_two_requests_at_once_both_complete(page):
    first, second = Client(page["url"], verbose=False), Client(page["url"], verbose=False)
    jobs = [first.submit(8, 1, "ancestral", 10, "", 1.0, api_name="/sample"),
            second.submit(8, 2, "ancestral", 10, "", 1.0, api_name="/sample")]
    results = [job.result(timeout=120) for job in jobs]
    assert [len(r[1]) for r in results] == [8, 8]
    assert not np.array_equal(pixels(results[0][1][0]), pixels(results[1][1][0]))


def test_a_cancelled_request_stops_and_frees_the_queue(page, tmp_path):
    """A long inpainting (64 results, 10 resamplings of every step: 91 network passes of 64 images) is cancelled
    while it runs; it ends as cancelled, and a request queued behind it completes."""
    image, layer, _ = squares(tmp_path)
    owner, other = Client(page["url"], verbose=False), Client(page["url"], verbose=False)
    long = owner.submit(editor(image, layer), 64, 0, 10, 1, "ddpm", 10, "", 1.0, api_name="/inpaint")
    deadline = time.monotonic() + 60
    while long.status().code.name not in ("PROCESSING", "PROGRESS") and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = other.submit(1, 0, "ancestral", 2, "", 1.0, api_name="/sample")
    # submitted, not awaited: the floor's gradio_client can end the owner's stream when the server cancels its
    # inpainting and then report its other pending call, this one, as cancelled; what follows checks the effect
    owner.submit(api_name="/cancel_inpaint")
    assert len(waiting.result(timeout=120)[1]) == 1
    with pytest.raises(Exception):
        long.result(timeout=120)
    assert not list((page["save"] / "page").glob("inpaint-*-seed0-63.png"))  # it never finished its 64 results


def test_uploads_and_results_stay_in_the_save_folder(page, tmp_path):
    image = picture(tmp_path / "kept-upload.png", np.full((SIZE, SIZE, 3), 90, dtype=np.uint8))
    grid = Client(page["url"], verbose=False).predict(handle_file(str(image)), 0.5, 1, 5, "ancestral", 3, "", 1.0,
                                                        api_name="/redraw")[0]
    assert [p.name for p in (page["save"] / "page" / "uploads").rglob("kept-upload.png")]
    assert (page["save"] / "page" / Path(grid).name).is_file()


def test_a_taken_port_and_a_missing_gradio_are_one_line_errors(page, tmp_path, monkeypatch, capsys):
    import main

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    port = page["url"].rsplit(":", 1)[1].strip("/")
    flags = ["--load_path", str(page["load_path"]), "--serve", "--save_folder", str(tmp_path / "out"),
             "--wandb", "disabled"]
    assert main.main([*flags, "--port", port]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port}" in err[0] and "--port" in err[0]
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if it were not installed
    assert main.main([*flags, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --serve needs Gradio, which is not installed: pip install -r requirements-page.txt"]


# the controls a model takes, on pages built here
def loaded(tmp_path, *, classes=(), channels=3):
    from sampling.model import LoadedModel, build_diffusion
    from settings.config import Config
    from settings.record import RunRecord

    config = Config(image_size=SIZE, unet_dim=8, dim_mults=(1, 2), num_res_blocks=1, time_steps=T, channels=channels,
                    class_conditional=bool(classes), device="cpu", save_folder=str(tmp_path))
    torch.manual_seed(0)
    diffusion = build_diffusion(config, classes).eval().requires_grad_(False)
    for p in diffusion.parameters():  # weights that make every layer matter (the output starts at zero)
        p.copy_(torch.randn_like(p) * 0.1)
    return LoadedModel.of(diffusion, config, run=RunRecord(classes=classes), step=7)


def shown(page, label: str) -> bool:
    props = [c["props"] for c in page.config["components"] if c.get("props", {}).get("label") == label]
    assert props, label
    return props[0].get("visible", True) is True


def test_class_controls_appear_only_for_a_class_conditional_model(tmp_path, monkeypatch):
    from serving.actions import Actions
    from serving.page import build_page

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    plain = build_page(Actions(loaded(tmp_path), tmp_path / "a"))
    conditional = build_page(Actions(loaded(tmp_path, classes=("red", "green")), tmp_path / "b"))
    for label in ("class", "guidance scale w", "turn it into the class"):
        assert not shown(plain, label) and shown(conditional, label)


def test_a_conditional_model_draws_and_redraws_towards_a_class(tmp_path):
    from serving.actions import Actions, PageError

    actions = Actions(loaded(tmp_path, classes=("red", "green")), tmp_path)
    image, _, _ = squares(tmp_path)
    fractions = []
    grid, singles = actions.redraw(image, 0.8, 2, 0, "ancestral", 5, "green", 2.0, progress=fractions.append)
    assert len(singles) == 2 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    towards = [np.asarray(Image.open(p)) for p in singles]
    plain = [np.asarray(Image.open(p)) for p in actions.redraw(image, 0.8, 2, 0, "ancestral", 5, None, 2.0)[1]]
    assert not np.array_equal(towards[0], plain[0])  # the class changes the result
    with pytest.raises(PageError, match="knows the classes red, green, not 'dog'"):
        actions.sample(1, 0, "ancestral", 5, "dog", 1.0)
    assert "classes red, green" in actions.describe() and "trained 7 steps" in actions.describe()


def test_a_grey_model_gives_grey_images(tmp_path):
    from serving.actions import Actions

    actions = Actions(loaded(tmp_path, channels=1), tmp_path)
    grid, singles = actions.sample(2, 0, "ancestral", 3)
    assert Image.open(grid).mode == "L" and all(Image.open(p).mode == "L" for p in singles)
    assert "grey" in actions.describe()
