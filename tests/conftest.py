"""Test-wide settings: never talk to anything but 127.0.0.1."""

import os

# Google auth must not probe the metadata server (it hangs with no network).
os.environ.setdefault("NO_GCE_CHECK", "true")
# gcsfs must not make the gRPC bucket-type call the emulator cannot answer.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import pytest  # noqa: E402

from tests.bit_checkpoints import write_checkpoint  # noqa: E402
from tests.gcs_emulator import gcs_emulator  # noqa: E402,F401  (the session fixture, for every test)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny BiT checkpoints (units 1,1,1,1): tags with the 21,843-class head, embed headless."""
    root = tmp_path_factory.mktemp("models")
    tags, embed = root / "tags.npz", root / "embed.npz"
    write_checkpoint(tags, units=(1, 1, 1, 1), width=1, num_classes=21843, seed=1)
    write_checkpoint(embed, units=(1, 1, 1, 1), width=1, num_classes=None, seed=2)
    return str(tags), str(embed)


@pytest.fixture
def beam_gcs(gcs_emulator):  # noqa: F811
    """The emulator, with Beam's GCS client anonymous; Beam's credential cache restored after."""
    from apache_beam.internal.gcp import auth

    from transforms.gcs import configure_beam_gcs

    saved = auth._Credentials._credentials, auth._Credentials._credentials_init
    assert configure_beam_gcs()
    yield gcs_emulator
    auth._Credentials._credentials, auth._Credentials._credentials_init = saved


@pytest.fixture(scope="session")
def job_output(models, tmp_path_factory):
    """One small local run of the job (tests/search_outputs.py): (OUTPUT, photo paths)."""
    from tests.search_outputs import run_job

    return run_job(tmp_path_factory.mktemp("search-job"), models)


@pytest.fixture(scope="session")
def serve_output(models, tmp_path_factory):
    """A job run over image files, a TFRecord and a tar (tests/search_outputs.py), retagged with
    the hand-made tags and categories and indexed: (OUTPUT, key -> original image bytes)."""
    from search.index import build_index
    from tests.search_outputs import retag, run_mixed_job

    root = tmp_path_factory.mktemp("serve")
    output, originals = run_mixed_job(root, models)
    tagged = retag(output, str(root / "tagged"))
    build_index(tagged, log_every_secs=0)
    return tagged, originals
