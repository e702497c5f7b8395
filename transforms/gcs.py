"""Beam's own GCS client (FileSystems on gs://) pointed at a local emulator.

Beam's `GcsIO` builds a google-cloud-storage client, which already sends every request to
`STORAGE_EMULATOR_HOST` when it is set. What it does not do: before that, Beam looks up Google
default credentials once per process (`auth.get_service_credentials`) and retries the lookup
with back-off (~25 s) when there are none; and when there are some (a developer's gcloud ADC)
it uses them against the emulator, refreshing tokens over the network.

`configure_beam_gcs()` fixes both for emulator runs only: with `STORAGE_EMULATOR_HOST` set, it
records "no credentials" in Beam's per-process credential cache, so Beam builds its anonymous
client (the path Beam itself takes when no credentials are found). Without the variable it does
nothing: real GCS runs are untouched. Call it once per process before the first gs:// access
(idempotent, cheap): in `pipeline.main.run()` and in the `setup()` of DoFns that touch gs://
(derive them from `GcsDoFn`), so that worker processes of the multi-process DirectRunner are
covered too.
"""

from __future__ import annotations

import logging
import os

import apache_beam as beam

_LOG = logging.getLogger(__name__)


def emulator_host() -> str | None:
    """The GCS emulator address from `STORAGE_EMULATOR_HOST`, or None for real GCS."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    return host if host and host != "default" else None


def configure_beam_gcs() -> bool:
    """Make Beam's GCS client anonymous when an emulator is configured; True if it did."""
    if not emulator_host():
        return False
    try:
        # Beam-internal (checked against 2.77): the cache get_service_credentials() fills.
        from apache_beam.internal.gcp.auth import _Credentials

        with _Credentials._credentials_lock:
            _Credentials._credentials = None
            _Credentials._credentials_init = True
    except (ImportError, AttributeError) as e:  # a future Beam: slower, still anonymous
        _LOG.warning("could not preset anonymous GCS credentials for Beam: %s", e)
        return False
    return True


class GcsDoFn(beam.DoFn):
    """Base of the DoFns that read or write files: `setup()` runs `configure_beam_gcs()` in the
    worker process (a subclass overriding `setup` calls `super().setup()`)."""

    def setup(self):
        configure_beam_gcs()
