"""Beam-free plumbing every layer shares: storage, console, exit codes, output schema and files,
image decoding. Imports neither Apache Beam, TensorFlow nor the project's other packages."""
