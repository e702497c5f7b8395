"""Beam PTransforms and DoFns of the tagging job: read, decode, infer, write."""
