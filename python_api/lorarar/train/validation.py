"""The validation curve of hypernetwork training: the objective on a split's pairs over fixed draws."""

from __future__ import annotations

import torch

import lorarar_kernels as lk

from .diffusion import DiffusionModel
from .lowrank import PairAdapter, hypernet_coefficients
from .objective import LoraData, fixed_draws, pair_mse, pair_targets


class Validation:
    """The objective (content MSE + style MSE, no similarity term) of a hypernetwork on a split's pairs, over
    fixed draws per pair (`objective.fixed_draws`: the draws of ``lorarar score --samples K --seed S``), mean
    over all draws. The targets are computed once; ``direct`` is the plain sum's value on the same draws."""

    def __init__(self, model: DiffusionModel, data: dict[str, LoraData], pairs, samples: int, seed: int):
        if not pairs:
            raise lk.LoraRarError("validation: the split has no pairs")
        self.model, self.data = model, data
        T = model.num_train_timesteps
        self.pairs = [(c, s, fixed_draws(data[c], data[s], samples, seed, T)) for c, s in pairs]
        self._targets: dict = {}
        self.direct: float | None = None

    def __call__(self, adapter: PairAdapter, net: lk.Hypernet | None) -> float:
        """Mean objective of ``net`` (None: the direct merge); leaves ``adapter`` on the last pair."""
        total, n = 0.0, 0
        with torch.no_grad():
            for k, (c, s, draws) in enumerate(self.pairs):
                dc, ds = self.data[c], self.data[s]
                adapter.set_pair(dc.lora, ds.lora)
                m = {} if net is None else hypernet_coefficients(net, dc.lora, ds.lora)
                for j, d in enumerate(draws):
                    if (k, j) not in self._targets:
                        self._targets[k, j] = pair_targets(self.model, adapter, dc, ds, d)
                    mse_c, mse_s = pair_mse(self.model, adapter, m, dc, ds, d, targets=self._targets[k, j])
                    total, n = total + float(mse_c + mse_s), n + 1
        return total / n
