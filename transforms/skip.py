"""Incremental runs: skip images whose key is already in earlier results (`--skip_keys_from`).

Only the `key` column of the earlier Parquet files is read (column projection), local or gs://
through Beam `FileSystems`. The known keys reach the filter as one side-input set, so the filter
streams the image records; a set of 10 million keys costs about 1 GB of worker memory.
"""
import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.records import ImageRecord

NAMESPACE = "bit_tagger"


def read_keys(path: str):
    """The `key` column of one Parquet file, as Python strings."""
    with FileSystems.open(path) as f:
        table = pq.read_table(f, columns=["key"])
    return table.column("key").to_pylist()


class _ExpandGlob(beam.DoFn):
    def process(self, pattern: str):
        for match in FileSystems.match([pattern])[0].metadata_list:
            yield match.path


def _is_new(record: ImageRecord, known: frozenset, counter) -> bool:
    if record.key in known:
        counter.inc()
        return False
    return True


class SkipKnownKeys(beam.PTransform):
    """PCollection[ImageRecord] -> the records whose key is not in the results matching `pattern`."""

    def __init__(self, pattern: str):
        super().__init__()
        self._pattern = pattern

    def expand(self, records):
        known = (records.pipeline
                 | "Pattern" >> beam.Create([self._pattern])
                 | "Expand" >> beam.ParDo(_ExpandGlob())
                 | "ReadKeys" >> beam.FlatMap(read_keys)
                 | "ToSet" >> beam.CombineGlobally(beam.combiners.ToSetCombineFn())
                 | "Freeze" >> beam.Map(frozenset))
        skipped = beam.metrics.Metrics.counter(NAMESPACE, "skipped_images")
        return records | "DropKnown" >> beam.Filter(_is_new, beam.pvalue.AsSingleton(known),
                                                   skipped)
