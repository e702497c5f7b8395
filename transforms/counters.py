"""The job's Beam counters, named once: the transforms count with them, `outputs.summarize` reads
them.

A counter is a (namespace, name) pair; `summary.json` sums each name over every step that counts it,
so a name used here and nowhere else would silently read 0: use these constants, never literals.
"""

from typing import NamedTuple

import apache_beam as beam

JOB_NAMESPACE = "bit_tagger"  # also the namespace of RunInference's own metrics


class Counter(NamedTuple):
    namespace: str
    name: str

    def metric(self):
        """The Beam counter to `inc()` (made in `__init__`/`setup`, incremented in the bundle)."""
        return beam.metrics.Metrics.counter(self.namespace, self.name)


READ_FILES = Counter("read", "read_files")  # files the input globs matched
READ_SKIPPED_FILES = Counter("read", "read_skipped_files")  # folder files no reader accepts
READ_SKIPPED_SPECIAL = Counter("read", "read_skipped_special")  # FIFOs, devices, sockets
READ_IMAGES = Counter("read", "read_images")  # image records read
READ_FAILURES = Counter("read", "read_failures")  # inputs that could not be read (failure rows)
READ_IGNORED_MEMBERS = Counter("read", "read_ignored_members")  # tar members that are no image
DECODED_IMAGES = Counter("decode", "decoded_images")
DECODE_FAILURES = Counter("decode", "decode_failures")
INFERRED_IMAGES = Counter(JOB_NAMESPACE, "inferred_images")
INFERENCE_FAILURES = Counter(JOB_NAMESPACE, "inference_failures")
SKIPPED_IMAGES = Counter(JOB_NAMESPACE, "skipped_images")  # already in --skip_keys_from

# The counters summary.json reports, in its order.
SUMMARY = (
    READ_FILES,
    READ_SKIPPED_FILES,
    READ_SKIPPED_SPECIAL,
    READ_IMAGES,
    READ_FAILURES,
    DECODED_IMAGES,
    DECODE_FAILURES,
    INFERRED_IMAGES,
    INFERENCE_FAILURES,
    SKIPPED_IMAGES,
)
