"""Reductions: problem-to-problem rewrites between the lifted network and the solver.

Modelled on cvxpy's reduction chain: a :class:`Reduction` maps a problem to an
easier (smaller, better conditioned, or decomposed) one, ``apply(problem) ->
(problem, inverse_data)``, and maps a solution of the easier problem back,
``invert(solution, inverse_data)``.  A :class:`Chain` applies its reductions in
order and inverts them in reverse.

lipsdp has two kinds:

* **LMI reductions** act on a :class:`Query` (one LMI to certify) and keep the
  verification target in step: :class:`ReduceInput` (same optimum, smaller
  matrix; solve only) and :class:`Precondition` (an exact power-of-two
  congruence, applied to the solved LMI and the verification target alike).
  Whatever they do, the bound is proven on the LMI of the network as given
  (docs/math.md §10), so no reduction can make a bound unsound.
* **Network reductions** act on a :class:`~lipsdp.network.Network` and map
  bounds back: :class:`Split` (docs/math.md §8.2: a chain network as a
  composition of pieces, the product of their bounds) and :class:`MaxMinAsReLU`
  (docs/math.md §4.4: the same function through ReLUs, for the paper's baseline).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from lipsdp import layer_sweep, progress
from lipsdp.constraints import check_lmi_memory, get_constraint
from lipsdp.input_metric import has_square_terms, preactivation_span
from lipsdp.lifting import Lifting
from lipsdp.lmi import LMIProblem, build_lmi
from lipsdp.reuse import solve_lmi
from lipsdp.rewrite import maxmin_as_relu
from lipsdp.scaling import chain_scales
from lipsdp.split import compose_bounds, split_chain

__all__ = ["Reduction", "Chain", "Query", "readouts", "queries", "ReduceInput", "Precondition", "preconditioning_scales",
           "composed_norm_scales", "Split", "MaxMinAsReLU"]


class Reduction:
    """A rewrite of a problem with its way back (cvxpy's ``Reduction``).

    Subclasses implement :meth:`apply`; :meth:`invert` defaults to the identity,
    for reductions whose solution means the same before and after.
    """

    def apply(self, problem):
        """``(reduced_problem, inverse_data)``."""
        raise NotImplementedError

    def invert(self, solution, inverse_data):
        """A solution of the original problem from one of the reduced problem."""
        return solution


class Chain(Reduction):
    """Reductions applied in order; :meth:`invert` undoes them in reverse order."""

    def __init__(self, reductions):
        self.reductions = list(reductions)

    def apply(self, problem):
        inverse = []
        for reduction in self.reductions:
            problem, data = reduction.apply(problem)
            inverse.append(data)
        return problem, inverse

    def invert(self, solution, inverse_data):
        for reduction, data in zip(reversed(self.reductions), reversed(inverse_data)):
            solution = reduction.invert(solution, data)
        return solution


@dataclass
class Query:
    """One LMI to certify, as it moves down the chain.

    Attributes
    ----------
    lifting : Lifting
        The lifting of the network as given.
    output_map : ndarray or None
        The read-out ``c`` of this query (None: the whole output).
    label : str
        ``""`` for l2; ``" (output i)"`` for the i-th l_inf query (docs/math.md §2).
    formulation, norm : str
    given : LMIProblem
        The LMI of the network as given, in the original variables; never changed.  For l2 with a
        first layer narrower than half the input it is the exactly equivalent restriction to that
        layer's input rows (:meth:`~lipsdp.lifting.Lifting.span_input`, docs/math.md §10.1), whose
        rounding is part of its error bound; :meth:`full` builds the unrestricted one.
    target : LMIProblem
        The verification target: ``given`` under the reductions' exact congruences, in the
        variables of ``solve``.
    solve : LMIProblem
        What the backend gets.
    scale : ndarray
        Original variables = ``scale * x`` for ``x`` in the variables of ``target`` (powers of
        two, so exact).
    """

    lifting: Lifting
    output_map: np.ndarray | None
    label: str
    formulation: str
    norm: str
    given: LMIProblem
    target: LMIProblem
    solve: LMIProblem
    scale: np.ndarray
    #: ``given`` is on the first layer's pre-activations (:mod:`lipsdp.input_metric`): solved as it is.
    preactivation: bool = False

    @classmethod
    def build(cls, lifting: Lifting, formulation: str, norm: str, output_map, label: str = "",
              restrict: bool = True) -> "Query":
        """The query of one read-out, its LMI built (docs/math.md §1, §2 for l_inf) and not yet reduced;
        ``restrict``: on the first layer's input rows where that applies (docs/math.md §10.1)."""
        span, pre = None, False
        if norm == "l2" and restrict:  # first-layer p p^T terms: on the pre-activations, else on the rows
            span = preactivation_span(lifting) if has_square_terms(lifting) else None
            span, pre = (lifting.span_input(), False) if span is None else (span, True)
        check_lmi_memory(expected_entries(lifting if span is None else span.lifting))
        lmi = build_lmi(lifting, formulation, output_map=output_map, norm=norm, span=span)
        return cls(lifting, output_map, label, formulation, norm, lmi, lmi, lmi, np.ones(lmi.n_var), pre)

    def full(self) -> LMIProblem:
        """The LMI of the network as given, never restricted to the input span (``--strict``'s exact test)."""
        return self.unrestricted().given

    def unrestricted(self) -> "Query":
        """This query on the unrestricted LMI (itself when it is not restricted), not yet reduced."""
        if self.given.input_metric is None:
            return self
        return Query.build(self.lifting, self.formulation, self.norm, self.output_map, self.label, restrict=False)


def expected_entries(lifting: Lifting) -> int:
    """The COO entries of the LMI's constraint terms where their families can count them (slope QCs: most)."""
    total = 0
    for k, P in enumerate(lifting.pre, start=1):
        op = lifting.network.op(lifting.blocks[k].node)
        count = getattr(get_constraint(op.function), "entry_count", None)
        total += 0 if count is None else count(op, P, lifting.selector(k))
    return total


def readouts(m: int, norm: str, output_map: np.ndarray | None) -> list[tuple[np.ndarray | None, str]]:
    """``(output_map, label)`` of every LMI a certificate stands for (docs/math.md §2): l2 certifies the
    whole (mapped) output at once, l_inf one scalar output at a time (each row of ``output_map``, or
    of the identity on the ``m`` outputs)."""
    if norm == "l2":
        return [(output_map, "")]
    C_out = np.eye(m) if output_map is None else output_map
    return [(C_out[i:i + 1], f" (output {i})") for i in range(len(C_out))]


def queries(lifting: Lifting, formulation: str, norm: str, output_map: np.ndarray | None) -> Iterator[Query]:
    """The :class:`Query` of every :func:`readouts` entry, each LMI built when it is reached (l_inf
    certifies one output at a time, so only one LMI is held at once)."""
    for omap, label in readouts(lifting.output.shape[0], norm, output_map):
        yield Query.build(lifting, formulation, norm, omap, label)


class ReduceInput(Reduction):
    """Solve on the input-reduced LMI (:meth:`~lipsdp.lifting.Lifting.reduce_input`).

    Only the input block changes (a rotation onto the row space the network sees
    its input through); ``rho`` and the multipliers are the same variables, so a
    solution needs no inversion.  l2 only: ``rho I`` is rotation invariant, the
    l_inf input block ``diag(lambda_in)`` is not.
    """

    def apply(self, query: Query):
        if query.norm != "l2" or query.preactivation:  # already on the m pre-activations of the first layer
            return query, None
        reduced = query.lifting.reduce_input()
        if reduced is query.lifting:
            return query, None
        # The LMI verified is restricted to the same input rows: share its later layers' terms
        # (lipsdp.reuse); otherwise build the reduced LMI in full.
        shared = None if query.output_map is not None else solve_lmi(query.given, reduced, query.formulation)
        return replace(query, solve=shared if shared is not None else
                       build_lmi(reduced, query.formulation, output_map=query.output_map, norm=query.norm)), None


def preconditioning_scales(lmi: LMIProblem, block_scale, trivial, sweeps=None, deadline=None):
    """``(block_scale, total, start)`` for :meth:`~lipsdp.lmi.LMIProblem.preconditioned`.

    On chain LMIs the scales are read off a layer-by-layer feasible point
    (:mod:`lipsdp.scaling`, improved by ``sweeps`` sweeps of :mod:`lipsdp.layer_sweep`,
    none after ``deadline``), and that point is a start hint for the solver;
    otherwise (any graph) the composed norm bounds ``block_scale``, ``trivial``
    and no hint (docs/math.md §1.4).
    """
    found = chain_scales(lmi)
    if found is not None:
        found = layer_sweep.sweep(lmi, found, sweeps, deadline=deadline)
    return (block_scale, trivial, None) if found is None else (found.block_scale, found.total, found.x)


def composed_norm_scales(lmi: LMIProblem, block_scale, trivial, **_):
    """The composed norm bounds themselves as scales, with no start hint (any graph)."""
    return block_scale, trivial, None


class Precondition(Reduction):
    """An exact power-of-two congruence that brings ``rho`` and the multipliers to order one.

    ``D M D / g`` is negative definite iff ``M`` is, and ``x = v * x'`` maps a point
    back exactly (:meth:`~lipsdp.lmi.LMIProblem.preconditioned`), so the solver and
    the rigorous float test both see a well-conditioned matrix.  The same
    congruence is applied to the solved LMI and to the verification target.

    Parameters
    ----------
    block_scale : ndarray
        Composed norm bound of every block (the input block's is 1).
    trivial : float
        Composed norm bound of the output.
    scales : callable
        ``scales(lmi, block_scale, trivial, deadline=...) -> (block_scale, total, start)``;
        :func:`preconditioning_scales` by default.
    deadline : float or callable, optional
        ``time.perf_counter()`` after which the scales stop improving, or a function of the LMI to solve
        that gives it (:func:`lipsdp.solve.sweep_deadline`).
    """

    def __init__(self, block_scale, trivial, *, scales=preconditioning_scales, deadline=None):
        self.block_scale, self.trivial, self.scales, self.deadline = block_scale, trivial, scales, deadline

    def apply(self, query: Query):
        deadline = self.deadline(query.solve) if callable(self.deadline) else self.deadline
        block_scale, total, start = self.scales(query.solve, self.block_scale, self.trivial, deadline=deadline)
        target, v = query.target.preconditioned(block_scale, total)
        if query.solve is query.target:  # one congruence serves both; only the hint differs
            solve = replace(target, start=None if start is None else start / v)
        else:
            solve, _ = replace(query.solve, start=start).preconditioned(block_scale, total)
        progress.objective_scale(v[0])  # the solver's objective times v[0] is rho (the progress display)
        return replace(query, target=target, solve=solve, scale=query.scale * v), v

    def invert(self, solution, v):
        """Objective values back in original units (the preconditioned objective is ``c^T x / v[0]``).

        The point stays in the congruent variables: the rigorous test runs there and
        maps it back exactly (``Query.scale``).
        """
        def unscale(value):
            return None if value is None or not np.isfinite(value) else value * v[0]

        return replace(solution, objective=unscale(solution.objective), dual=unscale(solution.dual))


class Split(Reduction):
    """A chain network as a composition of pieces (docs/math.md §8.2; :mod:`lipsdp.split`).

    ``apply`` cuts the network into pieces of at most ``layers`` activation layers
    (default: halves); ``invert`` turns the pieces' verified bounds into one for
    the whole network, their product rounded up: sound, looser than the SDP on the
    whole network.
    """

    def __init__(self, layers: int | None = None):
        self.layers = layers

    def apply(self, network):
        count = len(network.activations())
        pieces = split_chain(network, layers=self.layers if self.layers else max(1, (count + 1) // 2))
        return pieces, None

    def invert(self, bounds, inverse_data=None) -> float:
        return compose_bounds(bounds)


class MaxMinAsReLU(Reduction):
    """GroupSort-2 (MaxMin) rewritten as two-ReLU residual maps (docs/math.md §4.4).

    The rewritten network computes the same function (:func:`lipsdp.rewrite.maxmin_as_relu`),
    so a bound of it is a bound of the original: ``invert`` is the identity.  lipsdp
    uses it to report the ICLR 2024 paper's baseline next to the GroupSort constraint.
    """

    def __init__(self, variant: str = "two"):
        self.variant = variant

    @staticmethod
    def applies(network) -> bool:
        """Whether every GroupSort node sorts pairs (larger groups have no ReLU rewrite)."""
        groupsorts = [n for n in network.activations() if network.op(n).function == "groupsort"]
        pairs = [n for n in groupsorts
                 if network.op(n).params.get("group_size") == 2 or network.op(n).size == 2]
        return bool(pairs) and len(pairs) == len(groupsorts)

    def apply(self, network):
        return maxmin_as_relu(network, variant=self.variant), None
