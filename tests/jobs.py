"""Command lines of small local runs of the job, shared by the job-level tests."""


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
