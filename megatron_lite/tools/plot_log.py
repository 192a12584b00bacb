"""Plot the loss (and learning-rate) curves of training runs from their logs.

    python -m megatron_lite.tools.plot_log run.log [other.log ...] --out loss.png [--no-lr]
    python -m megatron_lite.tools.compare_logs straight.log resumed.log --plot loss.png

Each log's ` iteration N/ M | ... | learning rate: ... | lm loss: ... |` lines become one curve
(a later start of a run that appends to its log replaces the iterations it repeats, as in
compare_logs); the iterations where a log restarts (an iteration number that goes back, or a
checkpoint recovery report between two iteration lines) are marked with a dotted line, and
compare_logs also marks the first iteration where the runs differ. The learning rate goes in a
second panel below. Needs matplotlib (`pip install "megatron_lite[plot]"`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megatron_lite.tools.compare_logs import LogError, parse_line, read_lines

_RESTART_MARK = "checkpoint recovery report for"


class PlotError(Exception):
    """The figure cannot be drawn; the message says why and what to do."""


@dataclass
class Curves:
    path: str
    loss: Dict[int, float] = field(default_factory=dict)   # iteration -> lm loss
    lr: Dict[int, float] = field(default_factory=dict)     # iteration -> learning rate
    restarts: List[int] = field(default_factory=list)      # first iteration of each later start

    @property
    def label(self) -> str:
        return os.path.basename(self.path)


def _number(text: Optional[str]) -> float:
    try:
        return float(text) if text is not None else math.nan
    except ValueError:
        return math.nan


def read_curves(path: str) -> Curves:
    """The curves of one log; LogError when it cannot be read or has no iteration line."""
    lines = read_lines(path)
    curves, last, restarted = Curves(path), None, False
    for line in lines:
        if _RESTART_MARK in line and last is not None:
            restarted = True
        parsed = parse_line(line)
        if parsed is None:
            continue
        iteration, row = parsed
        if last is not None and (restarted or iteration <= last):
            curves.restarts.append(iteration)
        restarted, last = False, iteration
        curves.loss[iteration], curves.lr[iteration] = _number(row["loss"]), _number(row["lr"])
    if not curves.loss:
        raise LogError(f"{path} holds no iteration line; pass the log of a training run that printed them "
                       f"(--log-interval)")
    return curves


def plot(runs: Sequence[Curves], out: str, *, lr: bool = True, first_difference: Optional[int] = None) -> None:
    """Draw `runs` one over the other into the image file `out` (its extension picks the format)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError('plotting needs matplotlib: pip install "megatron_lite[plot]" (or pip install matplotlib)') \
            from None
    panels = 2 if lr else 1
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.2 * panels + 0.6), sharex=True, squeeze=False)
    loss_ax = axes[0][0]
    styles = ["-", "--", "-.", ":"]
    for i, run in enumerate(runs):
        its = sorted(run.loss)
        line, = loss_ax.plot(its, [run.loss[t] for t in its], styles[i % len(styles)], label=run.label, linewidth=1.2)
        if lr:
            axes[1][0].plot(its, [run.lr[t] for t in its], styles[i % len(styles)], color=line.get_color(),
                            linewidth=1.2)
        for j, r in enumerate(run.restarts):
            for row in axes:
                row[0].axvline(r, color=line.get_color(), linestyle=":", linewidth=1.0,
                               label=f"{run.label}: restart" if j == 0 and row[0] is loss_ax else None)
    if first_difference is not None:
        for row in axes:
            row[0].axvline(first_difference, color="red", linewidth=1.0,
                           label=f"first difference (iteration {first_difference})" if row[0] is loss_ax else None)
    loss_ax.set_ylabel("lm loss")
    loss_ax.legend(fontsize=8)
    loss_ax.grid(alpha=0.3)
    if lr:
        axes[1][0].set_ylabel("learning rate")
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Plot the loss and learning-rate curves of training logs.")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="training logs (one curve each)")
    parser.add_argument("--out", required=True, help="image file to write, e.g. loss.png")
    parser.add_argument("--no-lr", action="store_true", help="the loss only, without the learning-rate panel")
    args = parser.parse_args(argv)
    try:
        runs = [read_curves(p) for p in args.logs]
        plot(runs, args.out, lr=not args.no_lr)
    except (LogError, PlotError) as e:
        print(f"plot_log: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {', '.join(f'{r.label} ({len(r.loss)} iterations)' for r in runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
