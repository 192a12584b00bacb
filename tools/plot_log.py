"""Runs `python -m megatron_lite.tools.plot_log` (the loss and learning-rate curves of training logs)."""
import sys

from megatron_lite.tools.plot_log import main

sys.exit(main())
