"""Torch modules for Lipschitz networks that lipsdp certifies, for users without deel-torchlip.

``import lipsdp`` stays free of torch; ``import lipsdp.nn`` imports it.

=================== =============================================================
module              what it computes
=================== =============================================================
``GroupSort(g)``    ascending sort of consecutive groups of ``g`` channels
``GroupSort2``      ``GroupSort(2)``
``FullSort``        ``GroupSort`` over all channels
``MaxMin``          ``[relu(x), relu(-x)]`` (deel-torchlip's MaxMin, not GroupSort-2)
``HouseHolder(C)``  reflection of each channel pair ``(c, c + C/2)`` on one side of a line
``ImplicitLayer``   equilibrium layer ``z = phi(W z + U x + b)``, ``y = C z + D x``
``LinfDistance``    l_inf-distance neurons ``y_i = ||x - w_i||_inf + b_i`` (1-Lipschitz in l_inf)
``SortNet``         SortNet neurons: weighted order statistics of ``|x - w_i|``
=================== =============================================================

The activations have deel-torchlip's semantics and parameter layout (a model
switches between the two by changing the import); every way of saving a model
that lipsdp reads keeps working (whole-module pickle, TorchScript,
``torch.export``, ONNX for the sorts and MaxMin).
"""

from lipsdp.nn.activations import FullSort, GroupSort, GroupSort2, HouseHolder, MaxMin
from lipsdp.nn.implicit import ImplicitLayer
from lipsdp.nn.linf import LinfDistance, SortNet
from lipsdp.nn.attention import DotMultiheadSelfAttention, L2MultiheadSelfAttention, Residual

__all__ = ["DotMultiheadSelfAttention", "FullSort", "GroupSort", "GroupSort2", "HouseHolder", "ImplicitLayer",
           "L2MultiheadSelfAttention", "LinfDistance", "MaxMin", "Residual", "SortNet"]
