"""Published weights by short name or URL: downloaded from an HTTP server on 127.0.0.1 (CLS_WEIGHTS_URL) into the
cache, resumed after a broken connection, checked against the digest in their name, never used half-written, and a
fine-tune from them end to end."""
from __future__ import annotations

import hashlib
import http.server
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_TRAIN, make_imagefolder, run_cli, with_flags

from src.engine.published import BASE_URL_ENV, CACHE_ENV, PUBLISHED, cached_path, local_path
from src.errors import UserError


class Server:
    """Serves `root` on 127.0.0.1 with HTTP Range support; records each request's Range header; `cut_next` makes
    the next full response stop after that many bytes (a broken connection)."""

    def __init__(self, root: Path):
        self.root, self.ranges, self.cut_next = root, [], None
        self.etag = True  # False: a server that names no version of its files (no ETag, no Last-Modified)
        self.trickle = None  # seconds between the bytes of the body: a stuck or very slow server
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                path = server.root / self.path.lstrip("/")
                server.ranges.append(self.headers.get("Range"))
                if self.path == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.end_headers()
                    return
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                etag = f'"{hashlib.sha256(data).hexdigest()[:12]}"'
                start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1)) \
                    if self.headers.get("Range") else 0
                if self.headers.get("If-Range") not in (None, etag if server.etag else None):
                    start = 0  # the file changed since the part was fetched: all of it
                if start >= len(data) > 0:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                if server.etag:
                    self.send_header("ETag", etag)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cut_next is not None:
                    body, server.cut_next = body[:server.cut_next], None
                delay = server.trickle
                if delay is None:
                    self.wfile.write(body)
                    return
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(delay)
                except OSError:  # the client gave up (a stalled download ends)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    (tmp_path / "srv").mkdir()
    srv = Server(tmp_path / "srv")
    monkeypatch.setenv(BASE_URL_ENV, srv.url)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    yield srv
    srv.close()


def test_a_short_name_is_downloaded_once_into_the_cache(server, tmp_path):
    name = PUBLISHED["mindcv:resnet50"].file_name
    payload = np.random.default_rng(0).bytes(3_000_000)
    (server.root / name).write_bytes(payload)
    path = local_path("mindcv:resnet50", "pretrain_ckpt")
    assert path == tmp_path / "cache" / name and path.read_bytes() == payload
    assert local_path("mindcv:resnet50", "pretrain_ckpt") == path and len(server.ranges) == 1  # not again
    assert sorted(p.name for p in path.parent.iterdir()) == [name, name + ".lock"]


def test_a_broken_download_is_never_used_and_resumes_where_it_stopped(server, tmp_path):
    payload = np.random.default_rng(1).bytes(2_500_000)
    name = "model.safetensors"
    (server.root / name).write_bytes(payload)
    url = f"{server.url}/{name}"
    server.cut_next = 1_000_000
    with pytest.raises(UserError, match=r"the download of .* broke off at 1000000 of 2500000 bytes \(run again "
                                        r"to resume it, or download .* by hand to "):
        local_path(url, "pretrain_ckpt")
    dest = cached_path(url)
    assert dest.parent.parent == tmp_path / "cache" / "urls"  # a folder per URL: many files are model.safetensors
    part = dest.with_name(f"{name}.part")
    assert not dest.exists() and part.stat().st_size == 1_000_000
    assert local_path(url, "pretrain_ckpt") == dest
    assert server.ranges == [None, "bytes=1000000-"]
    assert dest.read_bytes() == payload and not part.exists()


def test_a_part_file_that_is_no_prefix_of_the_file_is_downloaded_anew(server):
    payload = np.random.default_rng(2).bytes(100_000)
    (server.root / "weights-20231225.ckpt").write_bytes(payload)  # a date, not a digest: not checked as one
    url = f"{server.url}/weights-20231225.ckpt"
    dest = cached_path(url)
    dest.parent.mkdir(parents=True)
    dest.with_name(dest.name + ".part").write_bytes(b"x" * 200_000)  # longer than the file: the server says 416
    assert local_path(url, "pretrain_ckpt").read_bytes() == payload
    assert server.ranges == [None]  # a part without the server's version of the file is not resumed


def test_a_download_whose_digest_differs_from_its_name_is_refused_and_removed(server, tmp_path):
    name = PUBLISHED["torchvision:resnet50"].file_name  # resnet50-0676ba61.pth: not this file's digest
    (server.root / name).write_bytes(b"not the published weights" * 1000)
    with pytest.raises(UserError, match=r"the download of torchvision:resnet50 is damaged: its sha256 is "
                                        r"[0-9a-f]{16}\.\.\., its name says 0676ba61"):
        local_path("torchvision:resnet50", "pretrain_ckpt")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [name + ".lock"]


def test_offline_says_which_file_to_fetch_by_hand_and_where(server, tmp_path):
    server.close()
    with pytest.raises(UserError) as info:
        local_path("mindcv:mobilenet_v2_100", "pretrain_ckpt")
    dest = tmp_path / "cache" / PUBLISHED["mindcv:mobilenet_v2_100"].file_name
    assert re.fullmatch(rf"cannot download mindcv:mobilenet_v2_100: .*\(offline, or a wrong URL\? download "
                        rf"{re.escape(server.url)}/mobilenet_v2_100-d5532038\.ckpt by hand to {re.escape(str(dest))}, "
                        r"or pass the file's path\)", str(info.value)), str(info.value)
    with pytest.raises(UserError, match=r"mindcv:mobilenet_v9 is not a published checkpoint this package knows "
                                        r"\(known: mindcv:mobilenet_v2_100, "):
        local_path("mindcv:mobilenet_v9", "pretrain_ckpt")


def test_fine_tuning_from_mindcvs_published_mobilenetv2_by_its_short_name(server, tmp_path):
    """The whole path a user takes: short name -> download -> mindcv layout recognised -> backbone loaded, classifier
    dropped -> trains -> a checkpoint that records where its weights came from."""
    mindcv = pytest.importorskip("mindcv")
    import mindspore as ms

    source = mindcv.create_model("mobilenet_v2_100", num_classes=1000)
    rng = np.random.default_rng(0)  # fixed weights (not the global seed: other tests of this worker draw from it)
    for p in source.get_parameters():
        if p.name.endswith("weight"):
            fan_in = int(np.prod(p.shape[1:]))
            p.set_data(ms.Tensor(rng.normal(0, np.sqrt(1.0 / fan_in), p.shape).astype(np.float32)))
    ms.save_checkpoint(source, str(server.root / PUBLISHED["mindcv:mobilenet_v2_100"].file_name))
    data = make_imagefolder(tmp_path / "data")
    out = tmp_path / "out"
    args = with_flags(TINY_TRAIN, width="1.0", lr_max="0.005")  # a random ImageNet-width net on 6 images
    result = run_cli("train.py", "--dataset_path", str(data), "--output_path", str(out), "--epoch_size", "1",
                     "--pretrain_ckpt", "mindcv:mobilenet_v2_100", "--filter_head", "True", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "mindcv mobilenet_v2_100 layout: 262/262 parameters mapped (bn_eps 1e-05, padding symmetric)" in log
    assert ("loaded 260 parameters, dropped 2 classifier parameters (head.1.bias, head.1.weight), 2 left at init "
            "(head.1.weight, head.1.bias)") in log
    from src.engine.checkpoint import read_checkpoint

    meta = read_checkpoint(out / "checkpoint" / "best.ckpt")[1]
    assert (meta.model, meta.width, meta.bn_eps, meta.padding) == ("mobilenetv2", 1.0, 1e-5, "symmetric")


def test_eval_export_and_predict_take_a_url(server, tmp_path):
    from src.config import Config
    from src.engine.checkpoint import save_checkpoint
    from src.engine.weights import open_for_inference
    from src.models import create_model

    save_checkpoint(create_model("mobilenetv2", 2, 0.25), server.root / "tiny.ckpt",
                    {"model": "mobilenetv2", "num_classes": 2, "width": 0.25, "image_size": 32})
    cfg, weights = open_for_inference(Config(), f"{server.url}/tiny.ckpt", "ckpt_file")
    assert (cfg.model, cfg.width, cfg.num_classes) == ("mobilenetv2", 0.25, 2)
    assert weights.path == cached_path(f"{server.url}/tiny.ckpt") and weights.path.is_file()


def test_a_file_that_changed_between_two_tries_is_downloaded_whole(server):
    """If-Range with the ETag the part was fetched with: a changed file is not appended to the old part."""
    (server.root / "w.ckpt").write_bytes(b"a" * 300_000)
    url = f"{server.url}/w.ckpt"
    server.cut_next = 100_000
    with pytest.raises(UserError, match="broke off at 100000 of 300000 bytes"):
        local_path(url, "pretrain_ckpt")
    (server.root / "w.ckpt").write_bytes(b"b" * 250_000)  # a new version of the file
    assert local_path(url, "pretrain_ckpt").read_bytes() == b"b" * 250_000
    assert server.ranges == [None, "bytes=100000-"]
    assert sorted(p.name for p in cached_path(url).parent.iterdir()) == ["w.ckpt", "w.ckpt.lock"]


def test_a_part_from_a_server_that_names_no_version_is_not_resumed(server):
    """Without an ETag or Last-Modified the server cannot say whether the file changed since the part came: a plain
    Range request spliced half the old file to half the new one (exit 0). The part is fetched whole instead."""
    server.etag = False
    (server.root / "w.ckpt").write_bytes(b"a" * 300_000)
    url = f"{server.url}/w.ckpt"
    server.cut_next = 100_000
    with pytest.raises(UserError, match="broke off at 100000 of 300000 bytes"):
        local_path(url, "pretrain_ckpt")
    (server.root / "w.ckpt").write_bytes(b"b" * 300_000)  # a new version of the file, of the same length
    assert local_path(url, "pretrain_ckpt").read_bytes() == b"b" * 300_000
    assert server.ranges == [None, None]


def test_a_stalled_download_ends_in_a_line_and_keeps_its_part(server, monkeypatch):
    from src.engine import published

    monkeypatch.setattr(published, "STALL_SECONDS", 1.0)
    monkeypatch.setattr(published, "STALL_BYTES", 1000)
    (server.root / "w.ckpt").write_bytes(b"a" * 40)
    server.trickle = 0.1  # 10 bytes a second: the 40 bytes would take 4 s
    url = f"{server.url}/w.ckpt"
    started = time.monotonic()
    with pytest.raises(UserError, match=r"^the download of \S+/w.ckpt stalled at \d+ bytes: \d+ bytes in the last 1 "
                                        r"s from \S+ \(a stuck or very slow server; run again to resume it, or "
                                        r"download .* by hand to "):
        local_path(url, "pretrain_ckpt")
    assert time.monotonic() - started < 3
    part = cached_path(url).with_name("w.ckpt.part")
    kept = part.stat().st_size
    assert 5 <= kept < 40 and not cached_path(url).exists()
    server.trickle = None
    assert local_path(url, "pretrain_ckpt").read_bytes() == b"a" * 40
    assert server.ranges == [None, f"bytes={kept}-"]  # resumed from the part


def test_sigterm_stops_a_trickling_download_at_once(server, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    (server.root / "w.ckpt").write_bytes(b"a" * 200)
    server.trickle = 0.2  # 40 s for the whole file
    script = ("import sys\n"
              "from src.errors import run_cli, stop_on_signals\n"
              "stop_on_signals()\n"
              "from src.engine.published import local_path\n"
              f"sys.exit(run_cli(lambda argv: local_path({server.url + '/w.ckpt'!r}, 'pretrain_ckpt') and 0))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = cached_path(server.url + "/w.ckpt").with_name("w.ckpt.part")
    deadline = time.monotonic() + 60
    while not part.exists() and time.monotonic() < deadline:  # the body is coming
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 3, "the signal waited for the download"
    assert proc.returncode == 128 + signal.SIGTERM and err.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in err and part.stat().st_size < 200 and not cached_path(server.url + "/w.ckpt").exists()


def test_a_redirect_loop_and_a_web_page_are_one_line_and_nothing_is_kept(server, tmp_path):
    with pytest.raises(UserError) as info:
        local_path(f"{server.url}/loop", "pretrain_ckpt")
    assert "\n" not in str(info.value) and "HTTP 302" in str(info.value) and "infinite loop" in str(info.value)
    page = b"<!DOCTYPE html>\n<html><body>Please log in</body></html>\n"
    (server.root / "w.ckpt").write_bytes(page)
    url = f"{server.url}/w.ckpt"
    with pytest.raises(UserError, match=r"^cannot download \S+: \S+ sent a web page, not weights \(a login, error or "
                                        r"mirror page\? check the URL or CLS_WEIGHTS_URL, or download "):
        local_path(url, "pretrain_ckpt")
    assert sorted(p.name for p in cached_path(url).parent.iterdir()) == ["w.ckpt.lock"]
    (server.root / "w.ckpt").write_bytes(b"weights" * 1000)  # the mirror is fixed: the next run downloads
    assert local_path(url, "pretrain_ckpt").read_bytes() == b"weights" * 1000
    cached_path(url).write_bytes(page)  # a page an earlier version of the package kept: fetched again
    assert local_path(url, "pretrain_ckpt").read_bytes() == b"weights" * 1000
