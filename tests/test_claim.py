"""core/claim.py: one holder at a time of a directory or gs:// prefix, named to the next claimant,
released when the holder dies (locally by the kernel, on gs:// by expiry)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse

import pytest

from core import claim as claims
from core.claim import ClaimedError, ClaimError, ClaimLostError, claim
from tests.mounts import read_only

HOLD = """
import sys, time
from core.claim import claim
held = claim(sys.argv[1], "a test holder", ttl_seconds=float(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def hold_in_subprocess(path, ttl=300.0) -> subprocess.Popen:
    """A process that claims `path` and sleeps; returns once it holds the claim."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(ttl)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


# ------------------------------------------------------------------------------------ local


def test_a_second_claim_names_the_holder_and_the_first_release_frees_it(tmp_path):
    out = tmp_path / "out"
    with claim(str(out), "a bit-tagger run") as held:
        assert (out / claims.CLAIM_FILE).exists()
        with pytest.raises(ClaimedError) as refused:
            claim(str(out), "a bit-tagger run")
        message = str(refused.value)
        assert f"{out} is claimed by a bit-tagger run (host {socket.gethostname()}, " in message
        assert f"pid {os.getpid()}, started {held.holder['started']})" in message
    assert not out.exists()  # the claim made the directory, and nothing else was put in it
    with claim(str(out), "a bit-tagger run"):
        (out / "results-00000-of-00001.parquet").write_bytes(b"x")
    assert sorted(p.name for p in out.iterdir()) == ["results-00000-of-00001.parquet"]


def test_a_killed_holder_never_blocks_the_next_claim(tmp_path):
    out = tmp_path / "out"
    holder = hold_in_subprocess(out)
    try:
        with pytest.raises(ClaimedError, match=f"a test holder .*pid {holder.pid},"):
            claim(str(out), "a bit-tagger run")
    finally:
        kill(holder)
    assert (out / claims.CLAIM_FILE).exists()  # kill -9: the file stays, the lock does not
    with claim(str(out), "a bit-tagger run") as held:
        assert json.loads((out / claims.CLAIM_FILE).read_text())["pid"] == os.getpid()
        assert held.token


def test_a_file_or_a_read_only_directory_cannot_be_claimed(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ClaimError, match=f"{tmp_path / 'file'} is a file, not a directory"):
        claim(str(tmp_path / "file"), "a bit-tagger run")
    with read_only(tmp_path / "ro") as readonly:
        with pytest.raises(ClaimError, match=f"cannot write to {readonly}: Read-only file system"):
            claim(str(readonly), "a bit-tagger run")


# ------------------------------------------------------------------------------------- gs://


def test_the_emulator_enforces_generation_preconditions(gcs_emulator):
    """What the gs:// claim relies on: create-if-absent and replace-if-unchanged are atomic."""
    bucket = gcs_emulator.new_bucket()
    gcs_emulator.upload(f"gs://{bucket}/a", b"1")

    def upload(generation):
        query = urllib.parse.urlencode(
            {"uploadType": "media", "name": "a", "ifGenerationMatch": generation}
        )
        return json.loads(
            gcs_emulator._request("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", b"2")
        )["generation"]

    with pytest.raises(urllib.error.HTTPError) as refused:
        upload("0")
    assert refused.value.code == 412
    live = json.loads(gcs_emulator._request("GET", f"/storage/v1/b/{bucket}/o/a"))["generation"]
    newer = upload(live)
    with pytest.raises(urllib.error.HTTPError) as refused:
        upload(live)  # the generation moved on
    assert refused.value.code == 412 and newer != live
    assert gcs_emulator.read(f"gs://{bucket}/a") == b"2"


def test_gcs_claim_is_exclusive_and_removed_on_release(gcs_emulator):
    prefix = f"gs://{gcs_emulator.new_bucket()}/tags/2024-06-01"
    with claim(prefix, "a bit-tagger run") as held:
        stored = json.loads(gcs_emulator.read(f"{prefix}/{claims.CLAIM_FILE}"))
        assert stored["pid"] == os.getpid() and stored["token"] == held.token
        with pytest.raises(ClaimedError) as refused:
            claim(prefix, "a bit-tagger run")
        assert f"pid {os.getpid()}, started {held.holder['started']})" in str(refused.value)
        assert "expires at" in str(refused.value)
    assert gcs_emulator.list(prefix) == []
    claim(prefix, "a bit-tagger run").release()


def test_gcs_claim_is_renewed_while_its_holder_lives_and_expires_when_it_dies(gcs_emulator):
    prefix = f"gs://{gcs_emulator.new_bucket()}/out"
    holder = hold_in_subprocess(prefix, ttl=2.0)  # renewed every 0.4 s
    try:
        time.sleep(3.0)  # longer than the ttl: only renewal keeps it
        with pytest.raises(ClaimedError, match=f"pid {holder.pid},"):
            claim(prefix, "a bit-tagger run")
    finally:
        kill(holder)
    time.sleep(2.5)  # no renewal for longer than the ttl: expired
    with claim(prefix, "a bit-tagger run") as held:
        stored = json.loads(gcs_emulator.read(f"{prefix}/{claims.CLAIM_FILE}"))
        assert stored["token"] == held.token


def test_a_holder_whose_claim_was_taken_over_knows_it_lost_it(gcs_emulator):
    prefix = f"gs://{gcs_emulator.new_bucket()}/out"
    held = claim(prefix, "a bit-tagger run", ttl_seconds=60, renew_seconds=0.2)
    gcs_emulator.upload(f"{prefix}/{claims.CLAIM_FILE}", b'{"what": "someone else"}')
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            held.check()
        except ClaimLostError as lost:
            assert f"lost the claim on {prefix}" in str(lost)
            break
        time.sleep(0.1)
    else:
        pytest.fail("the lost claim was not noticed")
    held.release()  # does not remove the other holder's claim
    assert gcs_emulator.read(f"{prefix}/{claims.CLAIM_FILE}") == b'{"what": "someone else"}'
