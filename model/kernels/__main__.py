"""`python -m model.kernels`: build the fused CPU kernels now (else the first model load does)."""

import sys

from model import kernels


def main():
    try:
        path = kernels.build()
    except kernels.KernelBuildError as e:
        print(
            f"model.kernels: not built: {e}\nThe job still runs, with TensorFlow-ops GroupNorm "
            f"(slower on CPU).",
            file=sys.stderr,
        )
        return 1
    loaded, description = kernels.status()
    print(
        f"model.kernels: {description}"
        if loaded
        else f"model.kernels: built {path} but not loadable: {description}"
    )
    return 0 if loaded else 1


if __name__ == "__main__":
    sys.exit(main())
