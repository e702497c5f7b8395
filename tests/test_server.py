"""`./run.sh serve` (search/server.py, search/service.py): the JSON API gives `search --json`'s
answers, its errors, thumbnails of every kind of input, path traversal and oversized uploads
refused, safe headers; the command line listens, prints its URL and stops on Ctrl-C."""

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
import warnings

import numpy as np
import pytest
from PIL import Image

with warnings.catch_warnings():  # Starlette 1.x would rather have httpx2; httpx does the job
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from core.decode import decode_thumbnail
from search import SearchError
from search.cli import main
from search.server import create_app, is_loopback, listen
from search.service import Service
from tests import search_outputs as so

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def service(serve_output):
    return Service(serve_output[0])


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service, allowed_hosts=["testserver", "127.0.0.1"]))


def cli_json(capsys, *argv) -> list:
    assert main(["search", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def plain(results) -> list:
    """An API answer's results as `search --json` prints them (without id and thumbnail)."""
    return [{k: v for k, v in r.items() if k not in ("id", "thumbnail")} for r in results]


def jpeg(client, url):
    response = client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    return np.asarray(Image.open(io.BytesIO(response.content)))


# ------------------------------------------------------------------------------- the queries


def test_tag_key_and_photo_answers_are_those_of_search_json(client, serve_output, capsys):
    output, originals = serve_output
    answer = client.get("/api/search", params={"tag": "dog", "k": 5}).json()
    assert plain(answer["results"]) == cli_json(capsys, output, "--tag", "dog", "--k", "5")
    assert answer["synsets"] == [{"wnid": so.DOG[0], "label": so.DOG[1]}]
    assert answer["took_ms"] > 0 and all(r["wnid"] == so.DOG[0] for r in answer["results"])
    key = "tf/r1"
    answer = client.get("/api/search", params={"key": key, "k": 4}).json()
    assert plain(answer["results"]) == cli_json(capsys, output, "--key", key, "--k", "4")
    assert key not in [r["key"] for r in answer["results"]]
    photo = os.path.join(os.path.dirname(output), "photo.jpg")
    with open(photo, "wb") as f:
        f.write(originals["wds/s1"])
    answer = client.post(
        "/api/search", params={"k": 3}, files={"image": ("p.jpg", originals["wds/s1"])}
    ).json()
    assert plain(answer["results"]) == cli_json(capsys, output, "--image", photo, "--k", "3")
    assert answer["results"][0]["key"] == "wds/s1" and answer["results"][0]["score"] > 0.999
    assert 0 < answer["embed_ms"] < answer["took_ms"]


def test_every_result_has_an_id_whose_thumbnail_url_serves_it(client, service):
    answer = client.get("/api/search", params={"tag": "crane"}).json()
    assert answer["results"]
    for result in answer["results"]:
        assert result["thumbnail"] == f"/api/thumbnail/{result['id']}?v={service.version}"
        assert service.location(result["id"]).key == result["key"]


def test_photo_within_a_tag(client, serve_output):
    _, originals = serve_output
    cat = client.post(
        "/api/search",
        params={"tag": "domestic_cat"},
        files={"image": ("p.jpg", originals["tf/r0"])},
    ).json()
    assert cat["results"] and all(r["wnid"] == so.CAT[0] for r in cat["results"])


def test_category_filters_narrow_and_are_offered_from_the_results(client, service):
    everything = client.get("/api/search", params={"tag": "crane", "k": 20}).json()
    offered = {c["wnid"]: c for c in everything["categories"]}
    # crane names a bird and a machine; the dogs carry one, the cats the other
    assert {so.DOG[0], so.CAT[0]} <= set(offered)
    assert offered[so.DOG[0]]["label"] == "dog" and offered[so.DOG[0]]["count"] == 4
    assert so.CRANE_BIRD[0] not in offered  # the tag asked for is not offered again
    narrowed = client.get(
        "/api/search", params={"tag": "crane", "k": 20, "filter": so.DOG[0]}
    ).json()
    keys = {r["key"] for r in narrowed["results"]}
    dogs = {
        r["key"]
        for r in client.get("/api/search", params={"tag": "dog", "k": 20}).json()["results"]
    }
    assert keys == dogs and len(keys) == 4
    assert narrowed["filters"] == [{"wnid": so.DOG[0], "label": "dog"}]
    assert all(r["wnid"] == so.CRANE_BIRD[0] for r in narrowed["results"])
    near = client.get("/api/search", params={"key": "tf/r1", "k": 20, "filter": so.CAT[0]}).json()
    assert near["results"] and {r["key"] for r in near["results"]} < (
        {
            r["key"]
            for r in client.get("/api/search", params={"tag": "domestic_cat", "k": 20}).json()[
                "results"
            ]
        }
    )


def test_suggestions_match_as_search_tag_does(client):
    got = client.get("/api/suggest", params={"q": "Golden Ret"}).json()["suggestions"]
    assert got[0]["term"] == "golden_retriever" and got[0]["wnid"] == so.GOLDEN[0]
    inner = [
        s["term"] for s in client.get("/api/suggest", params={"q": "retr"}).json()["suggestions"]
    ]
    assert "golden_retriever" in inner
    crane = client.get("/api/suggest", params={"q": "crane"}).json()["suggestions"]
    # a lemma naming two synsets suggests each, by its wnid
    assert sorted(s["value"] for s in crane) == sorted([so.CRANE_BIRD[0], so.CRANE_MACHINE[0]])
    assert (
        client.get("/api/suggest", params={"q": "n0208407"}).json()["suggestions"][0]["value"]
        == so.DOG[0]
    )
    assert client.get("/api/suggest", params={"q": ""}).json() == {"suggestions": []}


# -------------------------------------------------------------------------------- the errors


def test_unknown_tag_is_404_with_the_closest_lemmas(client):
    response = client.get("/api/search", params={"tag": "golden_retriver"})
    assert response.status_code == 404
    body = response.json()
    assert "unknown tag" in body["error"] and body["suggestions"][0] == "golden_retriever"


@pytest.mark.parametrize(
    "params, status, phrase",
    [
        ({"key": "no such key"}, 404, "is not in the index"),
        ({"tag": "dog", "k": "0"}, 400, "k must be an integer from 1 to 1000"),
        ({"tag": "dog", "k": "ten"}, 400, "k must be an integer"),
        ({"tag": "dog", "k": "1001"}, 400, "k must be an integer from 1 to 1000"),
        ({}, 400, "give one of tag or key"),
        ({"tag": "dog", "key": "tf/r1"}, 400, "give one of tag or key"),
        ({"tag": "  "}, 400, "the tag is empty"),
        ({"tag": "dog", "filter": "dog"}, 400, "a category filter is a wnid"),
    ],
)
def test_bad_queries_are_json_errors(client, params, status, phrase):
    response = client.get("/api/search", params=params)
    assert response.status_code == status
    assert phrase in response.json()["error"]


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"files": {"image": ("x.jpg", b"<html>not a photo</html>")}}, "cannot be decoded"),
        ({"files": {"image": ("x.jpg", so.corpus.bomb_png())}}, "pixel limit"),
        ({"files": {"picture": ("x.jpg", b"abc")}}, "no photo in the field image"),
        ({"content": b"raw bytes", "headers": {"content-type": "image/jpeg"}}, "multipart"),
    ],
)
def test_a_bad_photo_is_400_with_a_json_error(client, kwargs, phrase):
    response = client.post("/api/search", **kwargs)
    assert response.status_code == 400
    assert phrase in response.json()["error"]


def test_an_oversized_upload_is_refused_before_it_is_read(service):
    client = TestClient(create_app(service, max_upload_bytes=100_000))
    big = b"\xff" * 300_000
    response = client.post("/api/search", files={"image": ("x.jpg", big)})
    assert response.status_code == 413
    assert response.json()["error"] == "the photo is over the 97.7 KB limit"

    def chunks():  # no Content-Length: counted as it is read
        yield b"--b\r\nContent-Disposition: form-data; name=image; filename=x\r\n\r\n"
        yield from [big] * 3

    response = client.post(
        "/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413


def test_an_oversized_upload_over_a_socket_gets_413_without_sending_it_all(live_server):
    """A Content-Length over the limit is answered before the body is read; a chunked body is
    cut once it passes the limit (the live server's is 1 MB), not read to its end."""
    host, port = live_server
    head = b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += b"Content-Type: multipart/form-data; boundary=b\r\n"
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % (500 << 20))
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")
    chunk = b"%x\r\n%s\r\n" % (1 << 16, b"\xff" * (1 << 16))
    sent = 0
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        part = b"--b\r\ncontent-disposition: form-data; name=image; filename=x\r\n\r\n"
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        try:
            while sent < 200 << 20:
                sock.sendall(chunk)
                sent += 1 << 16
        except OSError:  # the server answered and closed the connection
            pass
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413") and sent < 50 << 20


# ---------------------------------------------------------------------------- the thumbnails


def test_thumbnails_of_files_records_tar_members_and_links_are_their_images(
    client, service, serve_output
):
    _, originals = serve_output
    answer = client.get("/api/search", params={"tag": "crane", "k": 100}).json()
    by_key = {r["key"]: r for r in answer["results"]}
    assert set(by_key) == set(originals)  # every image carries one of the two cranes
    kinds = {"file": 0, "record": 0, "member": 0}
    for key, original in originals.items():
        at = service.location(by_key[key]["id"])
        assert at.offset is not None and at.length is not None
        kinds[
            "record" if key.startswith("tf/") else "member" if key.startswith("wds/") else "file"
        ] += 1
        got = jpeg(client, by_key[key]["thumbnail"])
        want = decode_thumbnail(original)
        assert got.shape == want.shape and max(got.shape[:2]) <= 256
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 3, key
    assert kinds == {"file": 4, "record": 3, "member": 4}


def test_thumbnails_are_cached_and_marked_cacheable_only_with_their_version(client, service):
    result = client.get("/api/search", params={"tag": "dog"}).json()["results"][0]
    misses = service.thumbnails.misses
    first = client.get(result["thumbnail"])
    again = client.get(result["thumbnail"])
    assert first.content == again.content and service.thumbnails.misses <= misses + 1
    assert "immutable" in first.headers["cache-control"]
    bare = client.get(f"/api/thumbnail/{result['id']}")
    assert bare.status_code == 200 and bare.headers["cache-control"] == "no-cache"
    stale = client.get(f"/api/thumbnail/{result['id']}?v=0123456789ab")
    assert stale.status_code == 404 and "another version" in stale.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/thumbnail/../../../../etc/passwd",
        "/api/thumbnail/..%2f..%2f..%2fetc%2fpasswd",
        "/api/thumbnail/%2e%2e/%2e%2e/etc/passwd",
        "/api/thumbnail//etc/passwd",
        "/api/thumbnail/-1",
        "/api/thumbnail/1.5",
        "/api/thumbnail/0x10",
        "/api/thumbnail/99999999999999999999999999",
        "/api/thumbnail/999999",
        "/api/thumbnail/etc%2fpasswd",
        "/static/../search/server.py",
        "/static/..%2fserver.py",
        "/static/%2e%2e/%2e%2e/search/server.py",
        "/static//etc/passwd",
        "/etc/passwd",
        "/api/thumbnail/1?path=/etc/passwd",
    ],
)
def test_path_traversal_reads_nothing(client, path):
    response = client.get(path)
    if path.startswith("/api/thumbnail/1?"):  # an extra parameter is ignored: row 1's image
        assert response.headers["content-type"] == "image/jpeg"
        return
    assert response.status_code == 404, path
    assert b"root:" not in response.content and b"import" not in response.content


def test_thumbnails_of_an_output_written_before_the_offsets_scan_their_shard(
    serve_output, tmp_path, caplog
):
    """Results without source_offset/source_length (an older version's): thumbnails still come,
    found by a scan of each shard, with one warning per output."""
    import pyarrow.parquet as pq

    output, originals = serve_output
    old = so.results(output).drop_columns(["source_offset", "source_length"])
    old_output = so.write_output(str(tmp_path / "old"), old, so.footer(output))
    assert main(["index", old_output]) == 0
    [written] = [f for f in os.listdir(old_output) if f.startswith("results-")]
    assert "source_offset" not in pq.read_schema(os.path.join(old_output, written)).names
    old_service = Service(old_output)
    client = TestClient(create_app(old_service))
    results = client.get("/api/search", params={"tag": "crane", "k": 100}).json()["results"]
    with caplog.at_level(logging.WARNING, logger="search.originals"):
        for result in results:
            got = jpeg(client, result["thumbnail"])
            assert got.shape == decode_thumbnail(originals[result["key"]]).shape
    warnings = [r for r in caplog.records if "no recorded offsets" in r.getMessage()]
    assert len(warnings) == 1 and old_output in warnings[0].getMessage()


def test_a_rewritten_shard_never_serves_another_image(serve_output, tmp_path, models):
    """The job read a TFRecord and a tar; they are rewritten with their items reordered (the
    same names and keys, other offsets): a thumbnail is its own image or no image, never another."""
    import shutil

    from search.index import build_index
    from tests import corpus

    output, originals = serve_output
    inputs = tmp_path / "inputs"
    shutil.copytree(os.path.join(os.path.dirname(output), "inputs"), inputs)
    table = so.results(output)
    sources = [
        s.replace(os.path.join(os.path.dirname(output), "inputs"), str(inputs))
        for s in table.column("source").to_pylist()
    ]
    import pyarrow as pa

    table = table.set_column(1, "source", pa.array(sources))
    moved = so.write_output(str(tmp_path / "moved"), table, so.footer(output))
    build_index(moved, log_every_secs=0)
    moved_service = Service(moved)
    client = TestClient(create_app(moved_service))
    records = [(k, originals[k]) for k in ("tf/r2", "tf/r0", "tf/r1")]
    corpus.write_tfrecord(str(inputs / "shard.tfrecord"), records)
    corpus.write_tar(
        str(inputs / "shard.tar"),
        [
            ("wds/s2.jpg", originals["wds/s2"]),
            ("wds/s0.jpg", originals["wds/s0"]),
            ("wds/s1.jpg", originals["wds/s1"]),
        ],
    )
    results = client.get("/api/search", params={"tag": "crane", "k": 100}).json()["results"]
    served = 0
    for result in results:
        if not result["key"].startswith(("tf/", "wds/s")):
            continue
        response = client.get(result["thumbnail"])
        if response.status_code == 404:
            assert "rewritten" in response.json()["error"]
            continue
        got = np.asarray(Image.open(io.BytesIO(response.content)))
        want = decode_thumbnail(originals[result["key"]])
        assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).mean() < 3
        served += 1
    assert served >= 3  # the tar members are found by name; the records by key, or refused


# ----------------------------------------------------------------------------- safe by default


def test_every_response_has_the_security_headers(client):
    for path in ("/", "/api/search?tag=dog", "/api/search?tag=nothing_at_all", "/static/app.js"):
        response = client.get(path)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe" not in csp and "default-src 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"


def test_the_page_escapes_what_it_echoes_and_has_no_inline_script(client):
    hostile = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    html = client.get("/", params={"key": hostile}).text
    assert "<script>alert" not in html and "<img src=x" not in html
    escaped = "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"
    assert f'value="{escaped}"' in html  # text inside its attribute, the quote escaped
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, re.S)
    assert scripts == [""] and 'src="/static/app.js?v=' in html
    assert "style=" not in html and "<style" not in html


def test_other_host_names_are_refused_on_loopback(service):
    client = TestClient(create_app(service, allowed_hosts=["127.0.0.1", "localhost"]))
    assert client.get("/api/info", headers={"host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/api/info", headers={"host": "attacker.example"}).status_code == 400


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_the_model_loads_on_the_first_photo_and_stays(serve_output):
    fresh = Service(serve_output[0], count_images=False)
    assert fresh._model is None
    client = TestClient(create_app(fresh))
    client.get("/api/search", params={"tag": "dog"})
    assert fresh._model is None
    photo = serve_output[1]["tf/r0"]
    client.post("/api/search", files={"image": ("p.jpg", photo)})
    model = fresh._model
    client.post("/api/search", files={"image": ("p.jpg", photo)})
    assert model is not None and fresh._model is model


# ---------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def live_server(service):
    """The app under uvicorn on a free port of 127.0.0.1 (uploads up to 1 MB): (host, port)."""
    app = create_app(service, allowed_hosts=["127.0.0.1"], max_upload_bytes=1 << 20)
    with so.live(app) as url:
        host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()
        yield host, int(port)


def test_serve_prints_its_url_answers_and_stops_on_ctrl_c(serve_output):
    proc = subprocess.Popen(
        [sys.executable, "-m", "search", "serve", serve_output[0], "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+/) \(Ctrl-C stops\)", line).group(1)
        with urllib.request.urlopen(url + "api/search?tag=dog&k=2", timeout=30) as r:
            assert len(json.load(r)["results"]) == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in proc.stderr.read()


def test_another_host_is_warned_about_loudly(serve_output):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "search",
            "serve",
            serve_output[0],
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "serving" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "WARNING: listening on 0.0.0.0" in proc.stderr.read()


def test_a_port_in_use_or_no_index_is_one_line_and_exit_2(serve_output, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", serve_output[0], "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]
    assert main(["serve", str(tmp_path)]) == 2
    assert "no index at" in capsys.readouterr().err
    with pytest.raises(SearchError, match="cannot listen on 192.0.2.1"):
        listen("192.0.2.1", 0)  # an address of no interface here: nothing is sent
