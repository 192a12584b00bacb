"""Runs megatron_lite.tools.preprocess_data (python -m megatron_lite.tools.preprocess_data)."""
import sys

from megatron_lite.tools.preprocess_data import main

sys.exit(main())
