"""Downloading AFHQ, against a zip served by a local HTTP server on 127.0.0.1 (never the internet)."""
from __future__ import annotations

import io
import re
import shutil
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagedata import download
from imagedata.download import download_afhq, ensure_dataset, extract_classes
from runtime.errors import UserError


def png(seed: int) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, format="PNG")
    return out.getvalue()


def afhq_zip(prefix: str = "", extra: dict[str, bytes] | None = None) -> bytes:
    """An AFHQ-shaped archive: 3 images in each of train/{cat,dog,wild} and test/cat."""
    names = [f"{prefix}{split}/{cls}/{cls}_{i}.png" for split, classes in (("train", ("cat", "dog", "wild")),
                                                                           ("test", ("cat",)))
             for cls in classes for i in range(3)]
    entries = {name: png(seed) for seed, name in enumerate(names)}
    entries.update(extra or {})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return out.getvalue()


class Server:
    """What the handler serves and how; ``ranges`` records each request's Range header (or None)."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.honor_range = True
        self.cut_after: int | None = None  # send only this many body bytes, then hang up
        self.cuts_left = 0  # how many responses to cut (-1: all)
        self.status: int | None = None  # answer every request with this error
        self.skew = 0  # answer a Range request with a range starting this much later
        self.ranges: list[str | None] = []
        self.url = ""


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the http.server API)
        srv: Server = self.server.state
        srv.ranges.append(self.headers.get("Range"))
        if srv.status:
            self.send_error(srv.status)
            return
        body, start = srv.payload, 0
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if match and srv.honor_range:
            start = int(match.group(1)) + srv.skew
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if srv.cut_after is not None and srv.cuts_left != 0:
            srv.cuts_left -= 1
            self.wfile.write(body[start:start + srv.cut_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = Server(afhq_zip())
    httpd.state.url = f"http://127.0.0.1:{httpd.server_address[1]}/afhq_v2.zip"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


def fetch_cats(tmp_path: Path, server: Server, **kwargs) -> Path:
    kwargs.setdefault("progress", False)
    return download_afhq(tmp_path / "data", classes=("cat",), url=server.url, timeout=5, **kwargs)


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_download_extracts_only_the_classes_asked_for(tmp_path, server, capsys):
    train = fetch_cats(tmp_path, server, progress=True)
    assert train == tmp_path / "data" / "train"
    assert listing(tmp_path / "data") == [f"train/cat/cat_{i}.png" for i in range(3)]  # no dog, wild, test, zip
    with zipfile.ZipFile(io.BytesIO(server.payload)) as zf:
        assert (train / "cat" / "cat_1.png").read_bytes() == zf.read("train/cat/cat_1.png")
    err = capsys.readouterr().err
    assert "downloading AFHQ" in err and "extracting AFHQ" in err and "AFHQ ready: 3 cat images" in err


def test_several_classes_and_v1_layout(tmp_path, server):
    server.payload = afhq_zip(prefix="afhq/")
    download_afhq(tmp_path, classes=("dog", "wild"), url=server.url, progress=False, timeout=5)
    assert listing(tmp_path) == [f"train/{c}/{c}_{i}.png" for c in ("dog", "wild") for i in range(3)]


def test_broken_transfer_is_resumed_with_a_range_request(tmp_path, server):
    server.cut_after, server.cuts_left = 5000, 1
    fetch_cats(tmp_path, server)
    assert server.ranges == [None, "bytes=5000-"]
    assert len(listing(tmp_path / "data/train")) == 3


def test_partial_file_of_an_earlier_run_is_resumed(tmp_path, server):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "afhq_custom.zip.part").write_bytes(server.payload[:7000])
    fetch_cats(tmp_path, server)
    assert server.ranges == ["bytes=7000-"]
    assert len(listing(tmp_path / "data/train")) == 3


def test_server_that_ignores_range_restarts_from_scratch(tmp_path, server):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "afhq_custom.zip.part").write_bytes(b"x" * 7000)  # not even the right bytes
    server.honor_range = False
    fetch_cats(tmp_path, server)
    assert server.ranges == ["bytes=7000-"] and len(listing(tmp_path / "data/train")) == 3


def test_resume_answered_with_another_range_starts_over(tmp_path, server):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "afhq_custom.zip.part").write_bytes(server.payload[:7000])
    server.skew = 100
    fetch_cats(tmp_path, server)
    assert server.ranges == ["bytes=7000-", None] and len(listing(tmp_path / "data/train")) == 3


def test_repeated_breaks_give_up_keep_the_bytes_and_resume_next_run(tmp_path, server):
    server.cut_after, server.cuts_left = 3000, -1
    with pytest.raises(UserError, match=r"stopped at 9000 of \d+ bytes\); 9000 bytes are kept in .*next run "
                                        r"resumes .*get it by hand: download http://127.0.0.1") as info:
        fetch_cats(tmp_path, server, retries=2)
    assert "\n" not in str(info.value)
    server.cuts_left = 0
    fetch_cats(tmp_path, server)
    assert server.ranges[-1] == "bytes=9000-" and len(listing(tmp_path / "data/train")) == 3


@pytest.mark.parametrize("payload", [afhq_zip()[:-200], b"<html>Dropbox sign-in page</html>"], ids=["cut", "html"])
def test_incomplete_or_non_zip_archive_is_refused(tmp_path, server, payload):
    server.payload = payload  # the server believes this is the whole file
    with pytest.raises(UserError, match=r"is not a complete zip archive \(deleted; run again"):
        fetch_cats(tmp_path, server)
    assert listing(tmp_path / "data") == []


def test_no_connection_says_how_to_get_the_data_by_hand(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/afhq_v2.zip"
    with pytest.raises(UserError) as info:
        download_afhq(tmp_path / "data", classes=("cat",), url=url, progress=False, timeout=5)
    message = str(info.value)
    assert message.startswith(f"could not download AFHQ from {url} (") and "\n" not in message
    assert f"unzip it into {tmp_path / 'data'} so that" in message
    assert message.endswith(f"--data_path {tmp_path / 'data' / 'train'}")


def test_http_error_is_one_line(tmp_path, server):
    server.status = 404
    with pytest.raises(UserError, match=r"could not download AFHQ from .* \(HTTP 404 Not Found\); get it by hand"):
        fetch_cats(tmp_path, server)


def test_complete_archive_is_reused_without_downloading(tmp_path, server):
    fetch_cats(tmp_path, server, keep_archive=True)
    server.status = 500
    fetch_cats(tmp_path, server, keep_archive=True)
    assert len(server.ranges) == 1 and (tmp_path / "data" / "afhq_custom.zip").exists()


@pytest.mark.parametrize("name, attr, why", [
    ("train/cat/../../../evil.png", 0, "climbs out with .."),
    ("/tmp/evil.png", 0, "an absolute path"),
    ("C:/evil.png", 0, "an absolute path"),
    ("train/cat/link.png", 0o120777 << 16, "a symbolic link"),
])
def test_archive_with_escaping_entries_is_refused(tmp_path, name, attr, why):
    data = afhq_zip()
    out = io.BytesIO(data)
    with zipfile.ZipFile(out, "a") as zf:
        info = zipfile.ZipInfo(name)
        info.external_attr = attr
        zf.writestr(info, b"../../../../etc/passwd" if attr else b"evil")
    archive = tmp_path / "data" / "evil.zip"
    archive.parent.mkdir()
    archive.write_bytes(out.getvalue())
    with pytest.raises(UserError, match=f"holds an unsafe entry .*{re.escape(why)}.*nothing was extracted"):
        extract_classes(archive, tmp_path / "data", ("cat",), progress=False)
    assert listing(tmp_path) == ["data/evil.zip"]


def test_damaged_entry_is_caught_by_its_checksum(tmp_path):
    data = bytearray(afhq_zip())
    at = data.index(b"IDAT")  # inside the first stored PNG
    data[at + 20] ^= 0xFF
    archive = tmp_path / "afhq.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"afhq.zip is damaged \(train/cat/cat_0.png: Bad CRC-32"):
        extract_classes(archive, tmp_path, ("cat",), progress=False)
    assert listing(tmp_path) == ["afhq.zip"]


def test_bad_source_and_class(tmp_path):
    with pytest.raises(UserError, match="--dataset_source 'v3' is not one of v2, v1, cmu"):
        download_afhq(tmp_path, classes=("cat",), source="v3")
    with pytest.raises(UserError, match=r"cannot download AFHQ class\(es\) \['cow'\]"):
        download_afhq(tmp_path, classes=("cow",))
    assert set(download.AFHQ_URLS) == {"v2", "v1", "cmu"}
    assert all(url.startswith("https://") for url in download.AFHQ_URLS.values())


def test_ensure_dataset_downloads_into_the_default_location_only(tmp_path, server, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "mine" / "train"
    with pytest.raises(UserError, match=r"--data_path .*mine/train does not exist"):
        ensure_dataset(elsewhere, "cat", url=server.url, progress=False)
    assert ensure_dataset(elsewhere, "cat", download="never") == elsewhere
    assert server.ranges == []
    assert ensure_dataset("data/train", "cat", url=server.url, progress=False) == Path("data/train")
    assert listing(tmp_path / "data/train") == [f"cat/cat_{i}.png" for i in range(3)]
    ensure_dataset("data/train", "cat", url=server.url, progress=False)  # present: nothing fetched
    assert len(server.ranges) == 1


def test_ensure_dataset_fetches_the_missing_afhq_classes_for_all(tmp_path, server, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ensure_dataset("data/train", "cat", url=server.url, progress=False)
    (tmp_path / "data/train/cat/cat_0.png").write_bytes(b"kept: not fetched again")
    ensure_dataset("data/train", "all", url=server.url, progress=False)  # a class-conditional run after a cat run
    files = listing(tmp_path / "data/train")
    fetched = [f"{c}/{c}_{i}.png" for c in ("dog", "wild") for i in range(3)]
    assert [f for f in files if not f.startswith("cat/")] == fetched
    assert (tmp_path / "data/train/cat/cat_0.png").read_bytes() == b"kept: not fetched again"
    ensure_dataset("data/train", "all", url=server.url, progress=False)  # all present: nothing fetched
    assert len(server.ranges) == 2
    shutil.rmtree(tmp_path / "data/train/wild")
    assert ensure_dataset("data/train", "all", url=server.url, progress=False) == Path("data/train")
    assert len(server.ranges) == 2  # cat and dog: a choice someone made, so nothing fetched
    shutil.rmtree(tmp_path / "data/train/dog")
    shutil.move(tmp_path / "data/train/cat", tmp_path / "data/train/horse")
    assert ensure_dataset("data/train", "all", url=server.url, progress=False) == Path("data/train")
    assert len(server.ranges) == 2 and not (tmp_path / "data/train/cat").exists()  # the user's own folder


def test_ensure_dataset_always_fetches_anywhere_under_a_train_folder(tmp_path, server):
    ensure_dataset(tmp_path / "mine" / "train", "all", download="always", url=server.url, progress=False)
    assert len(listing(tmp_path / "mine" / "train")) == 9
    (tmp_path / "mine" / "train" / "cat" / "stray.txt").write_text("replaced by a fresh copy")
    ensure_dataset(tmp_path / "mine" / "train", "cat", download="always", url=server.url, progress=False)
    assert len(server.ranges) == 2 and len(listing(tmp_path / "mine" / "train")) == 9
    with pytest.raises(UserError, match=r"--data_path must end in /train .*got .*mine$"):
        ensure_dataset(tmp_path / "mine", "cat", download="always", url=server.url)
