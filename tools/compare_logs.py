"""Runs megatron_lite.tools.compare_logs (python -m megatron_lite.tools.compare_logs)."""
import sys

from megatron_lite.tools.compare_logs import main

sys.exit(main())
