"""Published weights by short name or URL: downloaded from an HTTP server on 127.0.0.1 (CLS_WEIGHTS_URL) into the
cache, resumed after a broken connection, checked against the digest in their name, never used half-written, and a
fine-tune from them end to end."""
from __future__ import annotations

import hashlib
import http.server
import re
import threading
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
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                path = server.root / self.path.lstrip("/")
                server.ranges.append(self.headers.get("Range"))
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                etag = f'"{hashlib.sha256(data).hexdigest()[:12]}"'
                start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1)) \
                    if self.headers.get("Range") else 0
                if self.headers.get("If-Range") not in (None, etag):
                    start = 0  # the file changed since the part was fetched: all of it
                if start >= len(data) > 0:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cut_next is not None:
                    body, server.cut_next = body[:server.cut_next], None
                self.wfile.write(body)

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
    assert server.ranges == ["bytes=200000-", None]


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
