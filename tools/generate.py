"""Runs megatron_lite.tools.generate (python -m megatron_lite.tools.generate)."""
import sys

from megatron_lite.tools.generate import main

sys.exit(main())
