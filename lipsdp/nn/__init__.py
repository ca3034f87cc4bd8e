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
``SLL``             SDP-based Lipschitz residual layer (Araujo et al. 2023)
``SLLConv2d``       its convolutional form (zero-padded, stride 1)
``LDLTResidual``    L-Lipschitz layer from an LDL^T factorisation of its LipSDP matrix
``AOL``             almost-orthogonal linear layer (Prach & Lampert 2022)
``CayleyLinear``    orthogonal linear layer: Cayley transform or matrix exponential
``ICLRNN``          input-convex Lipschitz RNN (Wang & Wu 2024): ReLU cells, non-negative weights
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
from lipsdp.nn.sll import SLL
from lipsdp.nn.sll_conv import SLLConv2d
from lipsdp.nn.ldlt import LDLTResidual
from lipsdp.nn.aol import AOL
from lipsdp.nn.cayley import CayleyLinear
from lipsdp.nn.iclrnn import ICLRNN

__all__ = ["AOL", "CayleyLinear", "DotMultiheadSelfAttention", "FullSort", "GroupSort", "GroupSort2", "HouseHolder",
           "ICLRNN", "ImplicitLayer", "L2MultiheadSelfAttention", "LDLTResidual", "LinfDistance", "MaxMin",
           "Residual", "SLL", "SLLConv2d", "SortNet"]
