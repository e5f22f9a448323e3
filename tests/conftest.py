"""Test setup: 4 virtual CPU devices, so sharded and pmap code runs for real."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Quiet TF-free tensorflow-datasets and absl.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
