"""Packages `pipeline`, `transforms`, `model`, `core` and `search` for local installs and Dataflow
workers."""

import pathlib

import setuptools

HERE = pathlib.Path(__file__).parent


def requirements():
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setuptools.setup(
    name="bit-tagger",
    version="0.1.0",
    description="Tag and embed millions of images with BiT in an Apache Beam batch job",
    python_requires=">=3.11",
    packages=[
        "core",
        "pipeline",
        "transforms",
        "model",
        "model.data",
        "model.kernels",
        "search",
        "search.pgvector",
    ],
    package_data={
        "pipeline": ["templates/*.html"],
        "model.data": ["*.txt", "*.tsv.gz", "WORDNET_LICENSE"],
        "model.kernels": ["*.cc"],
    },
    install_requires=requirements(),
    entry_points={"console_scripts": ["bit-tagger=pipeline.main:main"]},
)
