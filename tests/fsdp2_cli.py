"""``fastslow`` with accelerate's FSDP2 forced on CPU (see force_fsdp2.py); run by torchrun in the tests."""

import force_fsdp2  # noqa: F401  - before fastslow builds the engine

from fastslow.cli import app

app()
