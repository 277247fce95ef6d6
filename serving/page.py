"""The page of ``--serve``: a Gradio page to sample, inpaint and redraw with a loaded model.

``build_page`` lays out one tab per request of ``serving.actions.Actions`` (Sample, Inpaint, Redraw), with the
controls the model takes: a class picker and guidance only for a class-conditional model, and the steps slider
idle for a sampler that visits every timestep. Every run goes through one queue with one worker, so requests
from several people wait their turn (the page shows each its place) and one chain runs at a time; a cancel
button removes a waiting request, or stops a running one after its current network pass. Refused input shows
its message in the page and the server goes on. ``serve`` launches the page on ``--host`` and ``--port``,
through a public link only with ``--share``, and keeps Gradio's uploads and results under ``--save_folder``.
"""
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from runtime.errors import UserError
from serving.actions import MAX_IMAGES, Actions, Cancelled, PageError
from settings.config import EVERY_TIMESTEP, PAGE_EXTRA, SAMPLERS

NO_CLASS = "(no class)"
QUEUE = "chain"  # the one queue every run joins: one worker, one chain at a time
PAGE_CSS = "img { image-rendering: pixelated; }"  # a 32-px image shown large keeps its pixels sharp


def import_gradio():
    """Gradio, or a one-line error naming the extra requirements that bring it."""
    try:
        import gradio
    except ImportError:
        raise UserError(f"--serve needs Gradio, which is not installed: {PAGE_EXTRA}") from None
    return gradio


def path_of(upload) -> "str | None":
    """The stored file of an upload as an event without preprocessing receives it (a file record, or a path)."""
    return upload.get("path") if isinstance(upload, dict) else upload


def painted_region(editor: "dict | None") -> "np.ndarray | None":
    """The union of an image editor's painted layers (alpha above zero) at the size of its background, or None
    when no image was uploaded or it cannot be read (which ``Actions.read`` then says)."""
    background = path_of((editor or {}).get("background"))
    if not background:
        return None
    try:
        with Image.open(background) as im:
            region = np.zeros((im.height, im.width), dtype=bool)
    except OSError:
        return None
    for layer in editor.get("layers") or []:
        with Image.open(path_of(layer)) as im:
            alpha = np.asarray(im.convert("RGBA"))[:, :, 3] > 0
        if alpha.shape != region.shape:
            alpha = np.asarray(Image.fromarray(alpha).resize(region.shape[::-1], Image.Resampling.NEAREST))
        region |= alpha
    return region


class Cancels:
    """One cancel flag per browser session and tab: a run clears its own on start and asks it after every network
    pass; the cancel button sets it."""

    def __init__(self):
        self.flags: dict[str, threading.Event] = {}

    def start(self, session: str) -> threading.Event:
        flag = self.flags[session] = threading.Event()
        return flag

    def cancel(self, session: str) -> None:
        if session in self.flags:
            self.flags[session].set()


def build_page(actions: Actions):
    """The page for ``actions``' model, as a ``gradio.Blocks`` (not launched)."""
    gr = import_gradio()
    cancels = Cancels()
    conditional = bool(actions.classes)
    timesteps, default_sampler = actions.timesteps, actions.model.config.sampler
    default_steps = actions.model.config.chain_length

    def session_of(request, tab: str) -> str:
        """Whose run, in which tab: a cancel stops that tab's run of that browser session only."""
        return f"{getattr(request, 'session_hash', None) or 'local'}/{tab}"

    def call(method, request, progress, *args):
        flag = cancels.start(session_of(request, method.__name__))
        progress(0.0, desc="waiting for the model")
        try:
            grid, singles = method(*args, progress=lambda f: progress(f, desc="denoising"), cancelled=flag.is_set)
            return str(grid), [str(path) for path in singles]
        except PageError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Cancelled:
            raise gr.Error("cancelled", print_exception=False) from None

    def class_or_none(name):
        return None if name in (None, "", NO_CLASS) else name

    def sampler_controls():
        with gr.Row():
            sampler = gr.Dropdown(list(SAMPLERS), value=default_sampler, label="sampler")
            steps = gr.Slider(1, timesteps, value=default_steps, step=1, label="steps (network evaluations)",
                              interactive=default_sampler not in EVERY_TIMESTEP)
        sampler.change(lambda name: gr.Slider(value=timesteps if name in EVERY_TIMESTEP else default_steps,
                                              interactive=name not in EVERY_TIMESTEP),
                       sampler, steps, queue=False, api_visibility="private")
        return sampler, steps

    def class_controls(label: str):
        choices = [NO_CLASS, *actions.classes]
        name = gr.Dropdown(choices, value=NO_CLASS, label=label, visible=conditional, allow_custom_value=True)
        guidance = gr.Slider(0.0, 5.0, value=actions.model.config.guidance, step=0.25, label="guidance scale w",
                             visible=conditional)
        return name, guidance

    def common(count_label: str, count_default: int):
        with gr.Row():
            count = gr.Slider(1, MAX_IMAGES, value=count_default, step=1, label=count_label)
            seed = gr.Number(0, precision=0, minimum=0, label="seed")
        return count, seed

    def results_view(grid_label: str, singles_label: str):
        grid = gr.Image(type="filepath", label=grid_label, format="png", buttons=["download", "fullscreen"])
        return grid, gr.Gallery(label=singles_label, format="png", columns=8)

    def controls(count_label: str, count_default: int, class_label: str, grid_label: str, singles_label: str):
        """What every tab has, in its order: count and seed, sampler and steps, class and guidance, the Run and
        Cancel buttons, and the results (a grid and each image)."""
        count, seed = common(count_label, count_default)
        sampler, steps = sampler_controls()
        name, guidance = class_controls(class_label)
        with gr.Row():
            run = gr.Button("Run", variant="primary")
            stop = gr.Button("Cancel", variant="stop")
        grid, singles = results_view(grid_label, singles_label)
        return SimpleNamespace(count=count, seed=seed, sampler=sampler, steps=steps, name=name, guidance=guidance,
                               run=run, stop=stop, outputs=[grid, singles])

    def wire(run, stop, fn, inputs, outputs, api_name, *, uploads=False):
        # uploads reach ``actions`` as stored files, undecoded, so that a file that is not an image is its to refuse
        event = run.click(fn, inputs, outputs, api_name=api_name, concurrency_limit=1, concurrency_id=QUEUE,
                          preprocess=not uploads)

        def cancel(request: gr.Request):
            cancels.cancel(session_of(request, api_name))

        stop.click(cancel, None, None, cancels=[event], queue=False, api_name=f"cancel_{api_name}")

    image_kind = "grey" if actions.channels == 1 else "colour"
    with gr.Blocks(title="DDPM") as page:
        gr.Markdown(f"### A trained DDPM\n{actions.describe()}. Results are written to `{actions.folder}`.")
        with gr.Tab("Sample"):
            c = controls("images", 16, "class", f"samples ({image_kind}, {actions.size} px)", "each image")

            def sample(count, seed, sampler, steps, name, guidance, request: gr.Request, progress=gr.Progress()):
                return call(actions.sample, request, progress, count, seed, sampler, steps, class_or_none(name),
                            guidance)

            wire(c.run, c.stop, sample, [c.count, c.seed, c.sampler, c.steps, c.name, c.guidance], c.outputs, "sample")

        with gr.Tab("Inpaint"):
            editor = gr.ImageEditor(type="filepath", format="png", label="upload an image, then paint over the "
                                    "region to fill", brush=gr.Brush(colors=["#ff00ff"], default_size=12),
                                    sources=("upload", "clipboard"), transforms=(), layers=False)
            resample = gr.Slider(1, 10, value=actions.model.config.resample, step=1,
                                 label="resamplings per step (1 = plain replacement; cost grows with it)")
            candidates = gr.Slider(1, 16, value=min(actions.model.config.candidates, 16), step=1,
                                   label="fills to choose from: each result is the one most of them agree on "
                                   "(cost grows with it)")
            c = controls("results", 4, "class of the fill", "input, the hole, the results", "each result")

            def inpaint(editor, results, seed, resample, candidates, sampler, steps, name, guidance,
                        request: gr.Request, progress=gr.Progress()):
                background = path_of((editor or {}).get("background"))
                return call(actions.inpaint, request, progress, background, painted_region(editor), results, seed,
                            resample, candidates, sampler, steps, class_or_none(name), guidance)

            wire(c.run, c.stop, inpaint, [editor, c.count, c.seed, resample, candidates, c.sampler, c.steps, c.name,
                                          c.guidance], c.outputs, "inpaint", uploads=True)

        with gr.Tab("Redraw"):
            source = gr.Image(type="filepath", format="png", label="upload an image", sources=("upload", "clipboard"))
            strength = gr.Slider(0.0, 1.0, value=actions.model.config.strength, step=0.05,
                                 label="strength: 0 returns the image, 1 draws a new one")
            c = controls("results", 4, "turn it into the class", "input, the results", "each result")

            def redraw(source, strength, results, seed, sampler, steps, name, guidance, request: gr.Request,
                       progress=gr.Progress()):
                return call(actions.redraw, request, progress, path_of(source), strength, results, seed, sampler,
                            steps, class_or_none(name), guidance)

            wire(c.run, c.stop, redraw, [source, strength, c.count, c.seed, c.sampler, c.steps, c.name, c.guidance],
                 c.outputs, "redraw", uploads=True)
    page.queue(default_concurrency_limit=1)
    return page


def serve(model, config, *, block: bool = True):
    """Serve the page for the loaded ``model`` as ``config`` says (``--host``, ``--port``, ``--share``); its results
    and Gradio's uploads go under ``--save_folder``/page. Blocks until stopped unless ``block`` is False (a
    notebook shows the page inline and goes on); returns the launched page."""
    folder = Path(config.save_folder) / "page"
    os.environ["GRADIO_TEMP_DIR"] = str((folder / "uploads").resolve())  # uploads stay under the save folder
    page = build_page(Actions(model, folder))
    try:
        page.launch(server_name=config.host, server_port=config.port, share=config.share, prevent_thread_lock=True,
                    show_error=True, quiet=True, footer_links=["api"], allowed_paths=[str(folder.resolve())],
                    css=PAGE_CSS)
    except OSError as e:  # the port is taken, or the address is not this machine's
        where = f"port {config.port}" if config.port else "a free port from 7860"
        raise UserError(f"--serve cannot listen on {config.host}, {where} ({str(e).split(';')[0].split('. ')[0]}); "
                        f"pass another --port, or --host 127.0.0.1") from None
    reach = ("this machine only; --host 0.0.0.0 serves your network" if config.host in ("127.0.0.1", "localhost")
             else f"every machine that reaches {config.host}")
    shared = f", and {page.share_url} for anyone with the link" if page.share_url else ""
    print(f"page: {page.local_url} ({reach}){shared}; results go to {folder}; Ctrl+C stops it")
    if block:
        try:
            page.block_thread()
        except KeyboardInterrupt:
            page.close()
    return page
