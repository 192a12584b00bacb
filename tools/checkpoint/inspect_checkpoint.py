"""Runs megatron_lite.tools.inspect_checkpoint (python -m megatron_lite.tools.inspect_checkpoint)."""
import sys

from megatron_lite.tools.inspect_checkpoint import main

sys.exit(main())
