"""--load-weights-from: the model weights from one checkpoint, the training state from --load's.

An iterative-training pipeline writes weights-only "iteration models" between full trainer
checkpoints; `--load DIR --load-weights-from DIR2` resumes DIR's optimizer moments and step, LR
schedule, iteration, consumed samples, data position and RNG with DIR2's weights (weights-only or
full, any format, resharded as usual). The fp32 main params follow the loaded weights, not DIR's:
they are what the next optimizer step updates and copies back into the model.

Every checkpoint the run then saves records the weights it took (metadata.json's `weights_from`),
so a restart with the same command line whose --load checkpoint records the very checkpoint
--load-weights-from chooses resumes plainly instead of going back to those weights.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict

from megatron_lite.checkpoint.formats import SourceCheckpoint
from megatron_lite.checkpoint.recovery import LoadPlan

FLAG = "--load-weights-from"
STEP_FLAG = "--load-weights-from-step"
TRAINING_STATE = ("optimizer", "lr scheduler", "iteration and consumed samples", "rng")


@dataclass
class WeightsSource:
    """The --load-weights-from checkpoint chosen (its plan, metadata and reader), and whether its
    weights are taken: not when --load's checkpoint was trained from them already."""
    load_dir: str
    plan: LoadPlan
    metadata: dict
    source: SourceCheckpoint
    applied: bool = True

    @property
    def record(self) -> dict:
        """What the checkpoints saved after taking these weights record of them."""
        return {"checkpoint": os.path.abspath(self.plan.iter_dir), "saved_at": self.metadata.get("saved_at")}


def _short_reason(plan: LoadPlan) -> str:
    return {"tracker": "tracker", "fallback": "newest intact", "best": f"{plan.step_flag} best",
            "--ckpt-step": f"{plan.step_flag} {plan.iteration}"}[plan.reason]


def _from(value: str, plan: LoadPlan, flag: str) -> str:
    """`loaded, resharded ...` -> `loaded from DIR/iter_0000200 (--load, tracker), resharded ...`."""
    word, rest = re.match(r"(\w+)(.*)$", value).groups()
    return f"{word} from {plan.iter_dir} ({flag}, {_short_reason(plan)}){rest}"


def attribute_sources(restored: Dict[str, str], plan: LoadPlan, weights: WeightsSource) -> Dict[str, str]:
    """The report's restored lines, each loaded part saying which checkpoint it came from and why."""
    out = dict(restored)
    if weights.applied:
        out["weights"] = _from(restored["weights"], weights.plan, FLAG)
    else:
        out["weights"] = (_from(restored["weights"], plan, "--load") + f", which was trained from "
                          f"{weights.plan.iter_dir}'s weights already (its metadata.json says so): not taken again")
    for part in TRAINING_STATE:
        if out.get(part, "").startswith(("loaded", "restored")):
            out[part] = _from(out[part], plan, "--load")
    if weights.applied and out["optimizer"].startswith("loaded"):
        out["optimizer"] += "; fp32 main params from the loaded weights"
    return out


def keeping_main_params(sd: dict, optimizer) -> dict:
    """`sd` (--load's optimizer state) with the optimizer's current fp32 main params in place of its own:
    they were just refreshed from the --load-weights-from weights (`reload_model_params`), and a step
    updates the main params, so --load's would bring --load's weights back at the first step."""
    current = optimizer.state_dict()["params"]
    params = {name: dict(entry, main_param=current[name]["main_param"]) if "main_param" in current.get(name, {})
              else entry for name, entry in sd["params"].items()}
    return dict(sd, params=params)
