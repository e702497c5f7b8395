"""scikit-image's bundled sample photos (in its wheel, no download), for the tests and benchmarks
that need real photos rather than generated ones (tests/corpus.py)."""

import numpy as np

# The colour photos, in the order tests/first_run.py and bench/report_cost.py take them.
COLOUR_PHOTOS = (
    *("astronaut", "chelsea", "coffee", "rocket"),
    *("hubble_deep_field", "immunohistochemistry", "cat", "colorwheel"),
)


def sample_photo(name: str) -> np.ndarray:
    """`skimage.data.<name>()` as an H x W x 3 uint8 array: a boolean image as 0/255, a grey one
    repeated over the three channels, an alpha channel dropped. "motorcycle_left" is the left view
    of `stereo_motorcycle()` on releases without a function of that name."""
    from skimage import data

    if name == "motorcycle_left" and not hasattr(data, name):
        image = np.asarray(data.stereo_motorcycle()[0])
    else:
        image = np.asarray(getattr(data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)
