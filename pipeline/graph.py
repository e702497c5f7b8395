"""The job's Beam graph: read -> decode -> infer -> write (ARCHITECTURE.md, "Data flow")."""

import apache_beam as beam

from core.schema import failures_schema, results_schema
from model.wordnet import VERSION_NAME as WORDNET_VERSION
from pipeline.options import JobOptions
from transforms import progress
from transforms.decode import DecodeAndResize
from transforms.infer import InferenceConfig, InferTagsAndEmbeddings, ModelInfo
from transforms.prefetch import PrefetchDecodeAndResize
from transforms.read import ReadImages, split_patterns
from transforms.records import FAILURES
from transforms.sample import SampleThumbnails
from transforms.skip import SkipKnownKeys, work_dir
from transforms.write import BatchFailures, WriteParquet


def footer_metadata(opts: JobOptions, model: ModelInfo, basis=None) -> dict:
    """Key-value metadata of every results file: models, preprocessing, label set, categories
    and the PCA basis (`basis`: a `model.pca.PcaBasis`, or None)."""
    metadata = dict(model.metadata)
    metadata.update(
        {
            "image_size": str(opts.image_size),
            "resize": opts.resize,
            "preprocessing": f"decode RGB (EXIF-rotated, alpha on white), {opts.resize} bilinear "
            f"resize to {opts.image_size}x{opts.image_size}, uint8",
            "embedding_dtype": opts.embedding_dtype,
            "normalize_embeddings": str(opts.normalize_embeddings).lower(),
            "top_k": str(opts.top_k),
            "min_score": str(opts.min_score),
            "categories": "none" if opts.no_categories else WORDNET_VERSION,
            "categories_min_depth": str(opts.categories_min_depth),
        }
    )
    if basis is not None:
        metadata.update(
            {
                "pca_basis": opts.pca_basis,
                "pca_basis_sha256": basis.sha256,
                "pca_dims": str(basis.dims),
                "pca_input_dim": str(basis.input_dim),
            }
        )
    return metadata


def build(
    p: beam.Pipeline,
    opts: JobOptions,
    model: ModelInfo,
    basis=None,
    known_keys_dir=None,
    output=None,
):
    """Adds the whole job to `p`; returns the results and failures write results.

    `basis` is the PCA basis of `--pca_basis`, already loaded and checked by the launcher
    (`pipeline.main.check_pca_basis`); read here when not given (a dry-run job description).
    `known_keys_dir`: the work directory of `--skip_keys_from` (`transforms.skip.work_dir`), which
    the launcher removes after the run; a new one when not given. `output`: where the files go
    (the launcher's staging directory; default `--output`)."""
    output = (output or opts.output).rstrip("/")
    if basis is None and opts.pca_basis:
        from model.pca import load_basis

        basis = load_basis(opts.pca_basis)
    schema = results_schema(
        model.embedding_dim,
        embedding_dtype=opts.embedding_dtype,
        write_all_scores=opts.write_all_scores,
        num_classes=model.num_classes,
        metadata=footer_metadata(opts, model, basis),
        categories=not opts.no_categories,
        reduced_dim=basis.dims if basis is not None else None,
    )
    config = InferenceConfig.from_options(opts, schema)

    records, read_failures = p | "Read" >> ReadImages(
        split_patterns(opts.input),
        input_format=opts.input_format,
        key_feature=opts.key_feature,
        max_input_bytes=opts.max_input_bytes,
    )
    if opts.skip_keys_from:
        directory = known_keys_dir or work_dir(p.options, output)
        records = records | "SkipKnownKeys" >> SkipKnownKeys(opts.skip_keys_from, directory)
    if opts.decode_threads:
        decode = PrefetchDecodeAndResize(
            opts.image_size,
            max_pixels=opts.max_image_pixels,
            resize=opts.resize,
            threads=opts.decode_threads,
            batch_size=opts.batch_size,
        )
    else:
        decode = beam.ParDo(
            DecodeAndResize(opts.image_size, max_pixels=opts.max_image_pixels, resize=opts.resize)
        ).with_outputs(FAILURES, main="decoded")
    decoded = records | "Decode" >> decode
    # ~48 thumbnails for report.html, chosen by key hash from the decoded pixels.
    _ = decoded.decoded | "Sample" >> SampleThumbnails(output, resize=opts.resize)
    results, inference_failures = decoded.decoded | "Infer" >> InferTagsAndEmbeddings(
        config, model_copies=opts.model_copies
    )

    all_failures = (
        read_failures,
        decoded[FAILURES],
        inference_failures,
    ) | "AllFailures" >> beam.Flatten()
    failures = all_failures | "FailureBatches" >> BatchFailures()
    # Live progress of an in-process run (no-ops elsewhere): see transforms/progress.py.
    _ = records | "ProgressRead" >> beam.ParDo(progress.Tap(progress.READ))
    _ = read_failures | "ProgressReadFailures" >> beam.ParDo(progress.Tap(progress.READ))
    _ = results | "ProgressDone" >> beam.ParDo(progress.Tap(progress.DONE, rows=True))
    _ = all_failures | "ProgressFailed" >> beam.ParDo(progress.Tap(progress.FAILED))
    written_results = results | "WriteResults" >> WriteParquet(
        output, "results", schema, num_shards=opts.num_shards
    )
    written_failures = failures | "WriteFailures" >> WriteParquet(
        output, "failures", failures_schema(), num_shards=opts.num_shards
    )
    return written_results, written_failures
