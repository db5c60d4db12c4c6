"""Downloads against a local HTTP server (with Range support) and safe zip extraction."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path
from typing import ClassVar

import pytest

from caption_lib.download import download, extract_zip, prepare_flickr8k, sha256_of
from caption_lib.errors import CaptionLibError


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


PAYLOAD = _zip_bytes({"Flickr8k.token.txt": b"a.jpg#0\ta dog runs\n",
                      "Flicker8k_Dataset/a.jpg": bytes(range(256)) * 40})


class _Handler(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}
    ranges: ClassVar[list[str | None]] = []

    def do_GET(self):
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        header = self.headers.get("Range")
        self.ranges.append(header)
        if self.path.startswith("/norange"):  # a server without Range support
            header = None
        start = int(header.split("=")[1].split("-")[0]) if header else 0
        if start >= len(data):
            self.send_error(416)
            return
        self.send_response(206 if header else 200)
        if header:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    _Handler.files = {"/data.zip": PAYLOAD}
    _Handler.ranges = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_and_renames(server, tmp_path):
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    out = download(f"{server}/data.zip", tmp_path / "data.zip", digest, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert sha256_of(out) == digest
    assert not (tmp_path / "data.zip.part").exists()
    assert _Handler.ranges == [None]
    download(f"{server}/data.zip", out, digest, progress=False)  # complete: not fetched again
    assert _Handler.ranges == [None]


def test_checksum_mismatch_raises_and_leaves_nothing_complete(server, tmp_path):
    with pytest.raises(CaptionLibError, match="checksum mismatch"):
        download(f"{server}/data.zip", tmp_path / "data.zip", "0" * 64, progress=False)
    assert not (tmp_path / "data.zip").exists()
    assert not (tmp_path / "data.zip.part").exists()


def test_resume_from_a_partial_file(server, tmp_path):
    (tmp_path / "data.zip.part").write_bytes(PAYLOAD[:1000])
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    out = download(f"{server}/data.zip", tmp_path / "data.zip", digest, progress=False)
    assert _Handler.ranges == ["bytes=1000-"]
    assert out.read_bytes() == PAYLOAD


def test_a_server_without_range_support_restarts_the_file(server, tmp_path):
    _Handler.files["/norange.zip"] = PAYLOAD
    (tmp_path / "data.zip.part").write_bytes(b"garbage from an old run")
    out = download(f"{server}/norange.zip", tmp_path / "data.zip",
                   hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert out.read_bytes() == PAYLOAD


def test_a_whole_part_file_is_finished_without_refetching(server, tmp_path):
    (tmp_path / "data.zip.part").write_bytes(PAYLOAD)
    out = download(f"{server}/data.zip", tmp_path / "data.zip", progress=False)
    assert out.read_bytes() == PAYLOAD
    assert _Handler.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_http_errors_are_one_line(server, tmp_path):
    with pytest.raises(CaptionLibError, match=r"missing.zip: download failed \(HTTP 404"):
        download(f"{server}/missing.zip", tmp_path / "x.zip", progress=False)


def test_extract_zip(tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(PAYLOAD)
    out = extract_zip(archive, tmp_path / "out")
    assert (out / "Flickr8k.token.txt").read_text() == "a.jpg#0\ta dog runs\n"
    assert (out / "Flicker8k_Dataset" / "a.jpg").stat().st_size == 256 * 40


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/tmp/evil.txt",
                                  "C:\\evil.txt", "..\\evil.txt"])
def test_extract_rejects_members_escaping_the_target(tmp_path, name):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip_bytes({"ok.txt": b"fine", name: b"evil"}))
    with pytest.raises(CaptionLibError, match="outside"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written, not even the good member
    assert not (tmp_path / "evil.txt").exists()


def test_extract_only_named_members(tmp_path):
    archive = tmp_path / "splits.zip"
    archive.write_bytes(_zip_bytes({"dataset_flickr8k.json": b"{}", "dataset_coco.json": b"{}"}))
    extract_zip(archive, tmp_path / "out", ["dataset_flickr8k.json"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dataset_flickr8k.json"]


def test_not_a_zip_is_a_clear_error(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(CaptionLibError, match="x.zip: not a zip file"):
        extract_zip(tmp_path / "x.zip", tmp_path / "out")


def test_prepare_flickr8k_from_a_local_mirror(server, tmp_path, monkeypatch):
    from caption_lib import download as dl

    _Handler.files["/splits.zip"] = _zip_bytes({"data/dataset_flickr8k.json": b"{}"})
    monkeypatch.setattr(dl, "FLICKR8K_TEXT", dl.Source(f"{server}/data.zip"))
    monkeypatch.setattr(dl, "FLICKR8K_IMAGES", dl.Source(f"{server}/data.zip"))
    monkeypatch.setattr(dl, "KARPATHY_SPLITS", dl.Source(f"{server}/splits.zip"))
    root = prepare_flickr8k(tmp_path / "flickr8k", progress=False)
    assert (root / "Flickr8k.token.txt").is_file()
    assert (root / "dataset_flickr8k.json").read_text() == "{}"
    fetched = len(_Handler.ranges)
    assert prepare_flickr8k(root, progress=False) == root  # markers: nothing fetched again
    assert len(_Handler.ranges) == fetched
    assert Path(root / "downloads" / "data.zip").is_file()


def test_prepare_coco_from_a_local_mirror(server, tmp_path, monkeypatch):
    from caption_lib import download as dl

    _Handler.files["/splits.zip"] = _zip_bytes({"data/dataset_coco.json": b"{}",
                                                "data/dataset_flickr8k.json": b"[]"})
    _Handler.files["/train2014.zip"] = _zip_bytes({"train2014/COCO_train2014_1.jpg": b"x"})
    _Handler.files["/val2014.zip"] = _zip_bytes({"val2014/COCO_val2014_2.jpg": b"y"})
    monkeypatch.setattr(dl, "KARPATHY_SPLITS", dl.Source(f"{server}/splits.zip"))
    monkeypatch.setattr(dl, "COCO_TRAIN2014", dl.Source(f"{server}/train2014.zip"))
    monkeypatch.setattr(dl, "COCO_VAL2014", dl.Source(f"{server}/val2014.zip"))
    root = dl.prepare_coco(tmp_path / "coco", progress=False)
    assert (root / "dataset_coco.json").read_text() == "{}"
    assert not (root / "dataset_flickr8k.json").exists(), "only the COCO split file"
    assert (root / "train2014" / "COCO_train2014_1.jpg").read_bytes() == b"x"
    assert (root / "val2014" / "COCO_val2014_2.jpg").read_bytes() == b"y"
