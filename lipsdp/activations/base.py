"""The base class of the activation catalogue and the records it is built from.

An entry describes one scalar activation :math:`\\phi` completely: how to
evaluate it and its derivative (numpy), its exact slope sector as a function of
its parameters, the parameters with their defaults, and the names it has in the
model formats lipsdp reads (a ``torch.nn`` module class, ATen operators, ONNX
operator types).  The loaders' tables and the slope constraint are generated
from the entries (docs/math.md §0 for the sector and its quadratic constraint).

This module imports numpy and :mod:`lipsdp.errors` only: it sits at the bottom
of the layering, below the network graph and the constraints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

#: Outward rounding of sectors computed numerically (a sector may be wider, never narrower).
MARGIN = 1e-10

_CATALOGUE: dict[str, "SlopeActivation"] = {}

#: How the additive term of a caveat (:meth:`SlopeActivation.caveat`) follows from the per-neuron jumps.
JUMP_TOTAL = ("J = sup |f_framework - f_certified| <= the sum over such layers of (jump x sqrt(neurons) x the "
              "Lipschitz constant of the layers after it)")


class NotExpressible(ValueError):
    """Raised by an entry's name mapping for arguments the activation cannot express exactly.

    The message completes the operator's name (``"elu with scale != 1 (SELU/CELU)"``);
    the loaders turn it into an unsupported-layer entry.
    """


@dataclass(frozen=True)
class TorchModule:
    """A ``torch.nn`` module class whose ``forward`` is ``F.<aten>(input, *attributes)``.

    Attributes
    ----------
    path : str
        Defining module and class, ``"torch.nn.modules.activation.LeakyReLU"``.
    aten : str
        The ATen operator its forward calls (a key of the entry's :attr:`SlopeActivation.aten`).
    attributes : tuple of str
        The module attributes passed to that operator after the input, in schema order.
    """

    path: str
    aten: str
    attributes: tuple[str, ...] = ()

    @property
    def class_name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def aten_args(self, module) -> tuple:
        """The arguments after the input that ``module.forward`` passes to the ATen operator."""
        return tuple(getattr(module, a) for a in self.attributes)


def constant(value):
    """A tensor argument as a float64 numpy array (other values unchanged), without importing torch."""
    if hasattr(value, "detach"):
        return np.array(value.detach().cpu().numpy(), dtype=np.float64)
    return value


class SlopeActivation:
    """One elementwise activation :math:`\\phi`, slope-restricted in an exact sector ``[alpha, beta]``.

    :math:`\\alpha \\le (\\phi(a) - \\phi(b)) / (a - b) \\le \\beta` for all
    :math:`a \\ne b` (Fazlyab et al., NeurIPS 2019; docs/math.md §0).  A
    subclass that sets :attr:`name` is registered in the catalogue when its
    module is imported; every module of :mod:`lipsdp.activations` is imported
    by the package, so adding an activation is adding one module there.

    Attributes
    ----------
    name : str
        The ``function`` key of :class:`~lipsdp.network.Activation` nodes
        (fingerprints and certificates store it: never rename one).
    defaults : Mapping[str, Any]
        Its parameters and their default values (the keys of ``Activation.params``).
    torch_modules : tuple of TorchModule
        The ``torch.nn`` classes computing it.
    aten : Mapping[str, Callable]
        ATen operator name (no namespace) -> function of the operator's arguments
        after the input, in schema order (tensors as numpy arrays), returning
        ``Activation.params``; it raises :class:`NotExpressible` for arguments the
        entry cannot express.  TorchScript and ``torch.export`` share these names.
    onnx : Mapping[str, Callable]
        ONNX operator type -> function of ``(attributes, *constant inputs after the
        first)`` returning ``Activation.params`` (same contract).
    implicit : bool
        Offered by :class:`lipsdp.nn.ImplicitLayer` (docs/math.md §5.2).
    implicit_param : str or None
        The key of the one scalar parameter an implicit layer sets, if any.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, Any]] = {}
    torch_modules: ClassVar[tuple[TorchModule, ...]] = ()
    aten: ClassVar[Mapping[str, Callable[..., dict]]] = {}
    onnx: ClassVar[Mapping[str, Callable[..., dict]]] = {}
    implicit: ClassVar[bool] = False
    implicit_param: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in _CATALOGUE:
                raise ValueError(f"activation {cls.name!r} is already in the catalogue "
                                 f"({type(_CATALOGUE[cls.name]).__name__})")
            _CATALOGUE[cls.name] = cls()

    # -- parameters -------------------------------------------------------
    def param(self, params: Mapping, key: str):
        """``params[key]``, or its default."""
        return params.get(key, self.defaults[key])

    def real(self, params: Mapping, key: str) -> float:
        """A finite real parameter (``ValueError`` otherwise: no exact sector exists for it)."""
        value = float(self.param(params, key))
        if not math.isfinite(value):
            raise ValueError(f"{self.name}: parameter {key}={value} is not a finite number")
        return value

    # -- the function -------------------------------------------------------
    def evaluate(self, x: np.ndarray, params: Mapping) -> np.ndarray:
        """:math:`\\phi(x)` elementwise, as the model computes it."""
        raise NotImplementedError

    def derivative(self, x: np.ndarray, params: Mapping) -> np.ndarray:
        """:math:`\\phi'(x)` elementwise (a one-sided value at kinks), for sampled Jacobians."""
        raise NotImplementedError

    def sector(self, params: Mapping) -> tuple[float, float]:
        """The exact slope sector ``(alpha, beta)``: the infimum and supremum of the difference quotients.

        Raises
        ------
        ValueError
            For parameter values whose sector is not known exactly (non-finite ones, ...).
        """
        raise NotImplementedError

    def derivative_range(self, lo: np.ndarray, hi: np.ndarray, params: Mapping) -> tuple[np.ndarray, np.ndarray]:
        """The slope sector of :math:`\\phi` restricted to intervals: elementwise ``(alpha, beta)`` with
        :math:`\\alpha_i \\le (\\phi(a) - \\phi(b)) / (a - b) \\le \\beta_i` for all ``a != b`` in
        ``[lo_i, hi_i]`` (the range of :math:`\\phi'` there; docs/math.md §6).

        The default is the global :meth:`sector` (sound everywhere, not tightened); entries override it.
        Overrides round outwards and never leave the global sector.
        """
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        a, b = self.sector(params)
        return np.full(lo.shape, float(a)), np.full(hi.shape, float(b))

    def breakpoints(self, params: Mapping) -> tuple[float, ...]:
        """Where the evaluation switches formula or ``phi'`` jumps (tests probe pairs around them)."""
        return ()

    def discontinuity(self, params: Mapping) -> float:
        """The largest jump of :meth:`evaluate` (a framework's switch of formula), which the sector ignores.

        The sector is that of the mathematical function; a framework that switches
        to an approximation (torch's Softplus above its threshold) may jump by this much.
        """
        return 0.0

    def caveat(self, params: Mapping, neurons: int) -> str | None:
        """One line for the certificate where the framework's function is not the certified one (None if it is).

        The certified sector is that of the mathematical function; where :meth:`discontinuity` is positive
        the framework's function jumps by up to that much, and its Lipschitz inequality holds only up to
        an additive term (docs/math.md §0).
        """
        jump = self.discontinuity(params)
        if not jump > 0:
            return None
        return (f"{self.name}({', '.join(f'{k}={v:g}' for k, v in sorted(params.items()))}), {neurons} neurons: the "
                f"framework's function jumps by up to {jump:.2g} per neuron; the bound L holds for the continuous "
                f"function; for the framework's, |f(x) - f(y)| <= L |x - y| + 2 J, {JUMP_TOTAL}")

    # -- names in the model formats ----------------------------------------
    def module_params(self, module) -> dict:
        """``Activation.params`` of a ``torch.nn`` module instance of one of :attr:`torch_modules`."""
        for entry in self.torch_modules:
            if type(module).__name__ == entry.class_name:
                return self.aten[entry.aten](*(constant(a) for a in entry.aten_args(module)))
        raise KeyError(f"{type(module).__name__} is not a torch module of {self.name}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def catalogue() -> dict[str, SlopeActivation]:
    """A copy of the catalogue: ``Activation.function`` key -> entry."""
    return dict(_CATALOGUE)


def unimodal_range(derivative, lo, hi, peak: float = 0.0):
    """``(min, max)`` of a derivative that rises up to ``peak`` and falls after it, over ``[lo, hi]``
    elementwise, rounded outwards by :data:`MARGIN` (tanh, sigmoid)."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    low = np.minimum(derivative(lo), derivative(hi))
    high = derivative(np.clip(peak, lo, hi))
    return low - MARGIN, high + MARGIN


def sigmoid(x):
    """The logistic function, without overflow for large ``|x|``."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))
