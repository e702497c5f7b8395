"""`python -m search` (./run.sh index / search): output formats and exit codes, in process."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from search.cli import main
from tests import search_outputs as so
from tests.bit_checkpoints import write_checkpoint


@pytest.fixture(scope="module")
def indexed(job_output, tmp_path_factory):
    """(OUTPUT indexed at its default place, photos)."""
    output, photos = job_output
    tagged = so.retag(output, str(tmp_path_factory.mktemp("cli") / "out"))
    assert main(["index", tagged]) == 0
    return tagged, photos


def run(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's own errors (one line, exit 2)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_index_reports_what_it_did(indexed, capsys):
    output, _ = indexed
    rc, out, _ = run(capsys, "index", output)
    assert rc == 0
    assert f"indexed 0 new images of {so.NUM_PHOTOS} read from 1 files of {output}" in out
    assert f"{output}/index holds {so.NUM_PHOTOS} images" in out and "bytes/image" in out


def test_json_is_an_array_of_key_source_score_tags_best_first(indexed, capsys):
    output, photos = indexed
    rc, out, _ = run(capsys, "search", output, "--image", photos[2], "--k", "3", "--json")
    assert rc == 0
    hits = json.loads(out)
    assert len(hits) == 3 and set(hits[0]) == {"key", "source", "score", "tags"}
    assert hits[0]["key"] == hits[0]["source"] == photos[2] and hits[0]["score"] >= 0.999
    assert hits[0]["tags"] == ["golden_retriever", "crane"]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_tag_query_prints_a_table_and_lists_the_synsets_of_a_homonym(indexed, capsys):
    output, _ = indexed
    rc, out, err = run(capsys, "search", str(output) + "/index", "--tag", "crane", "--k", "3")
    assert rc == 0
    assert (
        f"names 2 synsets, all matched: {so.CRANE_BIRD[0]} (crane), {so.CRANE_MACHINE[0]} "
        "(crane)" in err
    )
    lines = out.strip().splitlines()
    assert lines[0].split() == ["#", "score", "key", "tags"] and len(lines) == 4
    assert lines[1].split()[0] == "1" and "[n0" in lines[1]


def test_key_query_with_k(indexed, capsys):
    output, photos = indexed
    rc, out, _ = run(capsys, "search", output, "--key", photos[0], "--k", "2", "--json")
    assert rc == 0
    assert [h["key"] for h in json.loads(out)] != [] and photos[0] not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tag", "no such tag"], "unknown tag 'no such tag'"),
        (["--key", "missing-key"], "key 'missing-key' is not in the index"),
        (["--key", "a", "--tag", "dog"], "give one of --image, --key or --tag"),
        ([], "give one of --image, --key or --tag"),
        (["--tag", "dog", "--k", "0"], "argument --k: must be an integer between 1 and 10000"),
        (["--tag", "dog", "--k", "1000000000"], "argument --k: must be an integer between 1 and"),
        (["--tag", "dog", "--k", "1e20"], "argument --k: must be an integer between 1 and 10000"),
        (["--tag", "dog", "--k", "ten"], "argument --k: must be an integer between 1 and 10000"),
        (["--key", "a", "--nprobes", "-1"], "argument --nprobes: must be an integer between 1"),
        (["--key", "a", "--nprobes", "0"], "argument --nprobes: must be an integer between 1"),
        (["--key", "a", "--refine_factor", "0"], "argument --refine_factor: must be an integer"),
    ],
)
def test_bad_queries_exit_2_with_one_line(indexed, capsys, argv, message):
    output, _ = indexed
    rc, out, err = run(capsys, "search", output, *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"run.sh search: error: {message}")


def test_bad_images_and_models_exit_2(indexed, capsys, tmp_path):
    output, photos = indexed
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"<html>404</html>")
    rc, _, err = run(capsys, "search", output, "--image", str(broken))
    assert rc == 2 and f"--image {broken} cannot be decoded" in err
    other = tmp_path / "other.npz"
    write_checkpoint(other, units=(1, 1, 1, 1), width=1, num_classes=None, seed=9)
    rc, _, err = run(capsys, "search", output, "--image", photos[0], "--embed_model", str(other))
    assert rc == 2 and "embedded by a different model" in err


def test_missing_index_and_usage_errors_exit_2(tmp_path, capsys):
    rc, _, err = run(capsys, "search", str(tmp_path), "--tag", "dog")
    assert rc == 2 and err.startswith(f"run.sh search: error: no index at {tmp_path}")
    rc, _, err = run(capsys, "index", str(tmp_path))
    assert rc == 2 and "no results-*.parquet in" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["search"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_module_entry_point_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "search", "search", str(tmp_path), "--tag", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "no index at" in done.stderr


# Runs `python -m search ARGS` as a user would, then records which heavy packages were imported.
_LOADED_MODULES = """
import atexit, json, runpy, sys
def record(path):
    with open(path, "w") as f:
        json.dump(sorted(m for m in sys.modules if m.split(".")[0] in
                         ("apache_beam", "transforms", "pipeline", "tensorflow")), f)
atexit.register(record, sys.argv[1])
sys.argv = ["search", *sys.argv[2:]]
runpy.run_module("search", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    "query", [["--help"], ["search", "OUTPUT", "--tag", "dog"], ["search", "OUTPUT", "--image"]]
)
def test_the_search_command_never_imports_beam(indexed, tmp_path, query):
    output, photos = indexed
    argv = [output if a == "OUTPUT" else a for a in query]
    argv += [photos[0]] if argv[-1] == "--image" else []
    record = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", _LOADED_MODULES, str(record), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(record.read_text())
    assert not [m for m in loaded if m.split(".")[0] in ("apache_beam", "transforms", "pipeline")]
    if "--image" in argv:  # the query image is embedded by the job's model, without Beam
        assert "tensorflow" in loaded and photos[0] in done.stdout


def test_index_arguments_are_checked(tmp_path, capsys):
    for argv, message in [
        (["--ann_min_rows", "-3"], "argument --ann_min_rows: must be an integer >= 0"),
        (["--log_every_secs", "nan"], "argument --log_every_secs: must be a number >= 0"),
    ]:
        rc, _, err = run(capsys, "index", str(tmp_path), *argv)
        assert (
            rc == 2 and err.startswith(f"run.sh index: error: {message}") and err.count("\n") == 1
        )


def test_keys_with_control_characters_are_escaped_in_the_table_and_exact_in_json(
    job_output, tmp_path, capsys
):
    output, _ = job_output
    hostile = "evil\x1b[2J\x1b]0;pwned\x07\r\nfake row"
    tagged = so.retag(output, str(tmp_path / "out"), key_prefix=hostile)
    assert main(["index", tagged]) == 0
    capsys.readouterr()
    rc, out, _ = run(capsys, "search", tagged, "--tag", "crane", "--k", "2")
    assert rc == 0 and "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "evil\\x1b[2J\\x1b]0;pwned\\x07\\r\\nfake row" in out
    assert len(out.strip().splitlines()) == 3  # header and two rows: no line a key made up
    rc, out, _ = run(capsys, "search", tagged, "--tag", "crane", "--k", "2", "--json")
    assert rc == 0 and all(h["key"].startswith(hostile) for h in json.loads(out))


def test_a_reader_that_stops_early_ends_the_search_quietly(indexed):
    output, _ = indexed
    done = subprocess.run(
        f"{sys.executable} -m search search {output} --tag crane --k 8 | head -1; "
        'echo "status ${PIPESTATUS[0]}"',
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.splitlines()[0].split() == ["#", "score", "key", "tags"]
    assert done.stdout.splitlines()[-1] == "status 0"
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


@pytest.mark.parametrize("part", ["data", "_versions"])
def test_a_damaged_index_file_exits_2_with_one_line_naming_the_index(
    indexed, tmp_path, capsys, part
):
    """A truncated data file, or truncated manifests (`_versions`), of images.lance."""
    output, _ = indexed
    damaged = tmp_path / "index"
    shutil.copytree(pathlib.Path(output) / "index", damaged)
    for data in (damaged / "images.lance" / part).glob("*.*"):
        data.write_bytes(data.read_bytes()[:100])
    rc, out, err = run(capsys, "search", str(damaged), "--tag", "golden retriever")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"run.sh search: error: the index {damaged} is damaged (")
    assert "Traceback" not in err
