"""What the readers' checks cost (transforms/read.py, transforms/webdataset.py): listing a folder
(one stat a file for its kind), reading image files (opened non-blocking, measured first), and
streaming a WebDataset tar (samples, damage and link bookkeeping), each against the bare operation
the job is built on, in the same run:

    listing      expand_input(folder)               vs Beam's FileSystems.match(folder/**)
    image files  iter_entries(file, "images")       vs FileSystems.open(file).read()
    tar          iter_entries(shard, "webdataset")  vs tarfile "r|*" reading every member

    .venv/bin/python bench/read_inputs.py [--files 4000] [--samples 4000] [--rounds 5]

Prints a table (least CPU seconds of --rounds, with the load average) and
`RESULT name=read_inputs ratio=<worst reader / bare> target=<=1.5 ...`. Data under bench/out/.
The image-file row is the harshest: a few microseconds a file (key text, one fstat) against a bare
open + read of a small file; decoding the same file takes about a millisecond.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
import time

from common import REPO, load_note, result_line, small_jpegs, write_files


def best_of(rounds: int, fn) -> float:
    """Least CPU seconds (user + system) of `rounds` calls: steadier than wall time on a shared
    machine, and what the checks add is CPU."""
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    from tests.corpus import write_webdataset
    from transforms.read import expand_input, iter_entries

    root = os.path.join(REPO, "bench", "out", "read_inputs")
    shutil.rmtree(root, ignore_errors=True)
    images = small_jpegs(max(args.files, args.samples))
    folder = os.path.join(root, "files")
    files = write_files(folder, images[: args.files])
    shard = os.path.join(root, "shard.tar")
    write_webdataset(
        shard, [(f"s{i:06d}", {"jpg": images[i], "json": b"{}"}) for i in range(args.samples)]
    )

    def bare_listing():
        return FileSystems.match([folder + "/**"])[0].metadata_list

    def bare_files():
        for path in files:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                f.read()

    def reader_files():
        for path in files:
            for _ in iter_entries(path, "images"):
                pass

    def bare_tar():
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                tar.extractfile(member).read()

    def reader_tar():
        for _ in iter_entries(shard, "webdataset"):
            pass

    assert len(expand_input(folder).files) == args.files
    rows = []
    for name, bare, reader in (
        ("listing", bare_listing, lambda: expand_input(folder)),
        ("image files", bare_files, reader_files),
        ("tar", bare_tar, reader_tar),
    ):
        bare_s, reader_s = best_of(args.rounds, bare), best_of(args.rounds, reader)
        rows.append((name, bare_s, reader_s, reader_s / bare_s))

    print(f"read_inputs: {args.files} files, {args.samples} tar samples; {load_note()}")
    print(f"{'CPU seconds':12} {'bare':>10} {'reader':>11} {'ratio':>7}")
    for name, bare_s, reader_s, ratio in rows:
        print(f"{name:12} {bare_s:10.3f} {reader_s:11.3f} {ratio:7.2f}")
    worst = max(rows, key=lambda r: r[3])
    shutil.rmtree(root, ignore_errors=True)
    result_line("read_inputs", worst[3], 1.5, higher_is_better=False, worst=worst[0])


if __name__ == "__main__":
    main()
