"""Beam PTransforms and DoFns of the tagging job: read, decode, infer, write."""

from transforms.gcs import configure_beam_gcs as _configure_beam_gcs

# Worker processes (multi-process runner, Dataflow) import this package before running any DoFn:
# with a GCS emulator configured, Beam's GCS client is made anonymous here once per process.
_configure_beam_gcs()
