"""The job's Beam graph: read -> decode -> infer -> write (DESIGN.md section 1)."""
import apache_beam as beam

from transforms.decode import DecodeAndResize
from transforms.prefetch import PrefetchDecodeAndResize
from transforms.infer import InferenceConfig, InferTagsAndEmbeddings, ModelInfo
from transforms.read import ReadImages, split_patterns
from transforms.records import FAILURES
from transforms.skip import SkipKnownKeys
from transforms.write import BatchFailures, WriteParquet, failures_schema, results_schema
from pipeline.options import JobOptions


def footer_metadata(opts: JobOptions, model: ModelInfo) -> dict:
    """Key-value metadata of every results file: models, preprocessing, label set."""
    metadata = dict(model.metadata)
    metadata.update({
        "image_size": str(opts.image_size),
        "resize": opts.resize,
        "preprocessing": f"decode RGB (EXIF-rotated, alpha on white), {opts.resize} bilinear "
                         f"resize to {opts.image_size}x{opts.image_size}, uint8",
        "embedding_dtype": opts.embedding_dtype,
        "normalize_embeddings": str(opts.normalize_embeddings).lower(),
        "top_k": str(opts.top_k),
        "min_score": str(opts.min_score),
    })
    return metadata


def build(p: beam.Pipeline, opts: JobOptions, model: ModelInfo):
    """Adds the whole job to `p`; returns the results and failures write results."""
    output = opts.output.rstrip("/")
    schema = results_schema(model.embedding_dim, embedding_dtype=opts.embedding_dtype,
                            write_all_scores=opts.write_all_scores,
                            num_classes=model.num_classes,
                            metadata=footer_metadata(opts, model))
    config = InferenceConfig(
        tags_model=opts.tags_model, embed_model=opts.embed_model, schema=schema,
        batch_size=opts.batch_size, precision=opts.precision, jit_compile=opts.xla,
        cache_dir=opts.model_cache_dir, top_k=opts.top_k, min_score=opts.min_score,
        embedding_dtype=opts.embedding_dtype, normalize_embeddings=opts.normalize_embeddings,
        write_all_scores=opts.write_all_scores, log_every_secs=opts.log_every_secs)

    records, read_failures = p | "Read" >> ReadImages(
        split_patterns(opts.input), input_format=opts.input_format,
        key_feature=opts.key_feature)
    if opts.skip_keys_from:
        records = records | "SkipKnownKeys" >> SkipKnownKeys(opts.skip_keys_from)
    if opts.decode_threads:
        decode = PrefetchDecodeAndResize(opts.image_size, max_pixels=opts.max_image_pixels,
                                         resize=opts.resize, threads=opts.decode_threads,
                                         batch_size=opts.batch_size)
    else:
        decode = beam.ParDo(DecodeAndResize(
            opts.image_size, max_pixels=opts.max_image_pixels, resize=opts.resize)
        ).with_outputs(FAILURES, main="decoded")
    decoded = records | "Decode" >> decode
    results, inference_failures = decoded.decoded | "Infer" >> InferTagsAndEmbeddings(
        config, model_copies=opts.model_copies)

    failures = ((read_failures, decoded[FAILURES], inference_failures)
                | "AllFailures" >> beam.Flatten()
                | "FailureBatches" >> BatchFailures())
    written_results = results | "WriteResults" >> WriteParquet(
        output, "results", schema, num_shards=opts.num_shards)
    written_failures = failures | "WriteFailures" >> WriteParquet(
        output, "failures", failures_schema(), num_shards=opts.num_shards)
    return written_results, written_failures
