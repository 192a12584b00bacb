"""Runs megatron_lite.tools.convert (python -m megatron_lite.tools.convert)."""
import sys

from megatron_lite.tools.convert import main

sys.exit(main())
