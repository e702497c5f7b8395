"""BiT (Big Transfer) ResNet-v2 models in TensorFlow: network, checkpoint loading, labels.

No Beam in this package: it is usable on its own, from a notebook or a script.
"""

# The job's default model sources (public, read anonymously). Kept here, free of TensorFlow imports,
# so command-line help and option parsing stay fast.
DEFAULT_TAGS_MODEL = "gs://bit_models/BiT-M-R50x1.npz"
DEFAULT_EMBED_MODEL = "gs://bit_models/BiT-M-R101x3.npz"
