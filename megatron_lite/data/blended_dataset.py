"""A weighted blend of GPT datasets (--data-path 0.3 a 0.7 b), as Megatron's BlendedDataset."""

from __future__ import annotations

import json
import os
from typing import List

import numpy as np
import torch

from megatron_lite.data import cache
from megatron_lite.data.helpers import build_blending_indices


def normalize(weights: List[float]) -> List[float]:
    """Weights scaled to sum to one (numpy float64, as Megatron, so blends agree bit for bit)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum; got {list(weights)}")
    return (w / w.sum()).tolist()


class BlendedDataset(torch.utils.data.Dataset):
    """`size` samples, sample i taken from datasets[dataset_index[i]] at dataset_sample_index[i].

    The indices come from helpers.build_blending_indices, so every prefix of the blend holds
    each dataset in proportion to its weight to within one sample; they are cached like the
    GPT indices.
    """

    def __init__(self, datasets: List, weights: List[float], size: int, cache_dir: str):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"a blend needs one weight per dataset; got {len(datasets)} datasets "
                             f"and {len(weights)} weights")
        self.datasets = datasets
        self.weights = normalize(weights)
        self.size = int(size)
        self.description = {"class": type(self).__name__, "weights": self.weights, "size": self.size,
                            "datasets": [d.description for d in datasets]}
        self.dataset_index, self.dataset_sample_index = self._load_or_build(cache_dir)
        taken = np.bincount(self.dataset_index, minlength=len(datasets))
        for dataset, count in zip(datasets, taken):
            if count > len(dataset):
                raise ValueError(f"the blend takes {count} samples from "
                                 f"{dataset.description['path_prefix']} but it has {len(dataset)}")

    def _load_or_build(self, cache_dir: str):
        directory = os.path.join(cache_dir, "blend_indices")
        base = os.path.join(directory, cache.description_hash(self.description))
        paths = [f"{base}-dataset_index.npy", f"{base}-dataset_sample_index.npy"]

        def build():
            arrays = build_blending_indices(np.array(self.weights, dtype=np.float64), self.size)
            for path, array in zip(paths, arrays):
                cache.save_array(path, array)
            cache.save_text(f"{base}-description.json", json.dumps(self.description, indent=2))

        cache.build_once(paths, build)
        return tuple(cache.load_array(p) for p in paths)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
