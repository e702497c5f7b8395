"""Command lines of small local runs of the job, shared by the job-level tests, the flag groups
several tests add to them, and the results' columns they expect."""

# The launcher's own required flags, valid-looking names (`python -m pipeline.dataflow`); the
# --input and --output of the job follow.
DATAFLOW_LAUNCH = (
    *("--project", "my-test-project", "--region", "us-central1"),
    *("--bucket", "gs://my-test-bucket", "--job_name", "bit-tagger-test"),
)

# The direct runner in two worker processes instead of one thread (pickled DoFns, split bundles).
MULTI_PROCESS = ("--direct_num_workers", "2", "--direct_running_mode", "multi_processing")

# The results' columns, in order, of a run with categories (the default) and a --pca_basis;
# --write_all_scores adds "scores" at the end.
PCA_RESULT_COLUMNS = (
    *("key", "source", "source_offset", "source_length", "width", "height", "tags", "categories"),
    *("embedding", "embedding_reduced"),
)


def job_args(inputs, output, models, *extra, image_size: int = 64, batch_size: int = 4) -> list:
    """argv of a quiet run of the job over `inputs` into `output` with the tiny test `models`
    ((tags, embed) checkpoint paths); `extra` flags go last."""
    tags, embed = models
    return [
        *("--input", str(inputs), "--output", str(output)),
        *("--tags_model", tags, "--embed_model", embed),
        *("--batch_size", str(batch_size), "--image_size", str(image_size)),
        *("--log_every_secs", "0"),
        *extra,
    ]
