"""Test-wide settings: never talk to anything but 127.0.0.1."""
import os

# Google auth must not probe the metadata server (it hangs with no network).
os.environ.setdefault("NO_GCE_CHECK", "true")
# gcsfs must not make the gRPC bucket-type call the emulator cannot answer.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
