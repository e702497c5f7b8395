"""Incremental runs: skip images whose key is already in earlier results (`--skip_keys_from`).

Only the `key` column of the earlier Parquet files is read (column projection), local or gs://
through Beam `FileSystems`. The known keys reach the filter as one side-input set, so the filter
streams the image records; a set of 10 million keys costs about 1 GB of worker memory.

`pattern` is a glob, or several comma-separated (like `--input`). A pattern that matches no file
skips nothing (a first nightly run has no earlier results yet) and logs a warning. Only results
are skipped: images that failed before are tried again.
"""
import logging

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.gcs import configure_beam_gcs
from transforms.read import match_files, split_patterns  # noqa: F401 (split_patterns re-exported)
from transforms.records import ImageRecord

NAMESPACE = "bit_tagger"
_LOG = logging.getLogger(__name__)


def read_keys(path: str) -> list:
    """The `key` column of one Parquet file, as Python strings."""
    with FileSystems.open(path) as f:
        table = pq.read_table(f, columns=["key"])
    return table.column("key").to_pylist()


class _ExpandGlob(beam.DoFn):
    """Glob -> the Parquet files it matches (none is fine: nothing to skip)."""

    def setup(self):
        configure_beam_gcs()  # worker processes touching gs:// with the emulator

    def process(self, pattern: str):
        paths = match_files(pattern)
        if not paths:
            _LOG.warning("--skip_keys_from %s matched no files: nothing is skipped", pattern)
        yield from paths


class _ReadKeys(beam.DoFn):
    def setup(self):
        configure_beam_gcs()

    def process(self, path: str):
        yield from read_keys(path)


class _DropKnown(beam.DoFn):
    def __init__(self):
        self._skipped = beam.metrics.Metrics.counter(NAMESPACE, "skipped_images")

    def process(self, record: ImageRecord, known):
        if record.key in known:
            self._skipped.inc()
        else:
            yield record


class KnownKeys(beam.PTransform):
    """PBegin -> a one-element PCollection: the frozenset of keys in the results matching `pattern`.

    Use it as `beam.pvalue.AsSingleton(p | KnownKeys(pattern))` to drop known inputs earlier than
    SkipKnownKeys does (e.g. image files by URI, before their bytes are read)."""

    def __init__(self, pattern):
        super().__init__()
        self._patterns = split_patterns(pattern)
        if not self._patterns:
            raise ValueError("--skip_keys_from needs at least one glob of results-*.parquet files")

    def expand(self, pbegin):
        return (pbegin
                | "Patterns" >> beam.Create(self._patterns)
                | "Expand" >> beam.ParDo(_ExpandGlob())
                | "DistinctFiles" >> beam.Distinct()
                | "ReadKeys" >> beam.ParDo(_ReadKeys())
                | "ToSet" >> beam.CombineGlobally(beam.combiners.ToSetCombineFn())
                | "Freeze" >> beam.Map(frozenset))


class SkipKnownKeys(beam.PTransform):
    """PCollection[ImageRecord] -> the records whose key is not in the results matching `pattern`.

    Counter `bit_tagger/skipped_images`: records dropped (the summary's `skipped`)."""

    def __init__(self, pattern):
        super().__init__()
        self._known = KnownKeys(pattern)

    def expand(self, records):
        known = records.pipeline | "KnownKeys" >> self._known
        return records | "DropKnown" >> beam.ParDo(_DropKnown(), beam.pvalue.AsSingleton(known))
