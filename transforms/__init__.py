"""Beam PTransforms and DoFns of the tagging job: read, decode, infer, write.

Importing this package has no side effect. Processes that touch gs:// call
`transforms.gcs.configure_beam_gcs()` explicitly: the launcher in `pipeline.main.run()`, and worker
processes in the `setup()` of every DoFn that reads or writes files (`transforms.gcs.GcsDoFn`).
"""
