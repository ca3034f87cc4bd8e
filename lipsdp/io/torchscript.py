"""TorchScript models (``torch.jit.script`` / ``torch.jit.trace`` + ``torch.jit.save``) -> Network.

The inlined graph of ``forward`` is evaluated symbolically: ATen operators go
through the shared table of :mod:`lipsdp.io.aten_ops`, ``prim::If`` branches on
conditions that the (known) shapes and attributes decide, and attributes are
read from the loaded module.  Each node's module hierarchy
(``"seq(Sequential).0(Linear)"``) names the user's layer in messages and
identifies whole modules translated from their parameters (deel-torchlip
``HouseHolder``).  Loading a TorchScript file runs no Python code.
"""

from __future__ import annotations

import operator
import re

from lipsdp.errors import ModelLoadError
from lipsdp.io.aten_ops import MODULE_HANDLERS, Poison, Translator, leaves, module_handler
from lipsdp.io.batch_axis import time_first_model, wrap
from lipsdp.io.builder import GraphBuilder, Label, Sym, Unsupported, layer_kind
from lipsdp.io.folding import Float64Translator
from lipsdp.io.formats import first_line

_SCOPE = re.compile(r"([^.()]+)\(([^()]*)\)")
_PURE = frozenset({"prim::Constant", "prim::GetAttr", "prim::ListConstruct", "prim::TupleConstruct"})


def load_torchscript(path: str, input_shape=None):
    """Read a ``torch.jit.save`` archive and translate it."""
    import torch

    import lipsdp.nn  # noqa: F401  (needs torch; registers torch.ops.lipsdp.equilibrium, which archives may call)

    try:
        module = torch.jit.load(path, map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the TorchScript archive ({first_line(exc)})") from exc
    return network_from_script(module, input_shape=input_shape, source=path)


def infer_input_shape(module, source: str) -> tuple[int, ...]:
    """``(in_features,)`` from the first weight of the module (a Linear's ``(out, in)``).

    Parametrized weights (``0.parametrizations.weight.original``) count as weights.
    """
    for name, p in module.named_parameters():
        if name.split(".")[-1] == "weight_ih_l0":  # nn.RNN: a sequence model (lipsdp.io.rnn)
            raise ModelLoadError(f"{source}: a recurrent model maps sequences: give the horizon T (horizon=T, "
                                 f"command line --horizon T) or input_shape=(T, {int(p.shape[1])})")
        if "weight" in name.split("."):
            if p.dim() == 2:
                return (int(p.shape[1]),)
            break
    raise ModelLoadError(f"{source}: cannot infer the input shape of this TorchScript model; "
                         "pass input_shape (command line: --input-shape)")


def network_from_script(module, input_shape=None, source: str = ""):
    """Translate a ``torch.jit.ScriptModule`` whose ``forward`` takes one tensor.

    Parameters
    ----------
    module : torch.jit.ScriptModule
        Translated in the mode it was saved in: a scripted model's ``self.training`` is read like
        any attribute, so BatchNorm and Dropout in training mode are refused, as in its traced
        and exported copies (save it after ``model.eval()``).
    input_shape : tuple of int, optional
        Sample shape without batch axis; default ``(in_features,)`` of the first weight.
    source : str
        Name used in messages.
    """
    graph = module.inlined_graph
    inputs = list(graph.inputs())
    if len(inputs) != 2:
        raise ModelLoadError(f"{source}: forward takes {len(inputs) - 1} inputs; lipsdp certifies models "
                             "with exactly one")
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else infer_input_shape(module, source)
    builder = GraphBuilder(source)
    walker = _Walker(Float64Translator(builder, batch=1), module, source, shape)
    walker.env[inputs[0].unique()] = module
    walker.env[inputs[1].unique()] = wrap(builder.input(shape, name=inputs[1].debugName().split(".")[0]),
                                          1 if time_first_model(module) else 0)  # (T, batch, n): batch_axis
    walker.walk(list(graph.nodes()))
    outputs = [walker.env[v.unique()] for v in graph.outputs()]
    walker.t.raise_errors()
    result = walker.t.resolve(outputs[0]) if len(outputs) == 1 else outputs
    if isinstance(result, (list, tuple)):
        raise ModelLoadError(f"{source}: the model returns {len(result)} values; lipsdp certifies one output tensor")
    if not isinstance(result, Sym):
        raise ModelLoadError(f"{source}: the output does not depend on the input")
    return builder.finish(result)


class _Walker:
    def __init__(self, t: Translator, root, source: str, shape):
        self.t = t
        self.root = root
        self.source = source
        self.shape = shape
        self.env: dict = {}

    # -- helpers ----------------------------------------------------------
    def _set(self, node, value) -> None:
        outs = list(node.outputs())
        if len(outs) == 1:
            self.env[outs[0].unique()] = value
        elif isinstance(value, Poison):
            for o in outs:
                self.env[o.unique()] = Poison()
        else:
            for o, v in zip(outs, value):
                self.env[o.unique()] = v

    def _label(self, node) -> tuple[Label, list]:
        scopes = [(n, k) for n, k in _SCOPE.findall(node.getModuleHierarchy() or "")
                  if n not in ("SELF", "UNKNOWN_INSTANCE")]
        if scopes:
            return Label(".".join(n for n, _ in scopes), layer_kind(scopes[-1][1])), scopes
        op = node.kind().split("::")[-1]
        out = next(iter(node.outputs()), None)
        name = out.debugName().split(".")[0] if out is not None else op
        return Label(f"{op}_{name}" if name.isdigit() else name, op), scopes

    # -- the walk ----------------------------------------------------------
    def walk(self, nodes: list) -> None:
        skip: set = set()
        for position, node in enumerate(nodes):
            if position in skip:
                continue
            label, scopes = self._label(node)
            group = self._module_group(nodes, position, scopes)
            if group is not None:
                skip.update(group[0])
                self._translate_module(nodes, group, position)
                continue
            self._node(node, label, position)

    def _node(self, node, label: Label, position: int) -> None:
        kind = node.kind()
        ins = [self.env.get(v.unique()) for v in node.inputs()]
        t = self.t
        if kind == "prim::Constant":
            try:
                value = node.output().toIValue()
            except Exception:
                value = None
            self._set(node, value)
        elif kind == "prim::GetAttr":
            self._set(node, getattr(ins[0], node.s("name")))
        elif kind == "prim::ListConstruct":
            self._set(node, list(ins))
        elif kind == "prim::TupleConstruct":
            self._set(node, tuple(ins))
        elif kind == "prim::DictConstruct":
            self._set(node, dict(zip(ins[::2], ins[1::2])))
        elif kind in ("prim::ListUnpack", "prim::TupleUnpack"):
            self._set(node, ins[0])
        elif kind == "prim::TupleIndex":
            self._set(node, ins[0] if isinstance(ins[0], Poison) else ins[0][ins[1]])
        elif kind in ("prim::unchecked_cast", "prim::NumToTensor"):
            self._set(node, _as_tensor(ins[0]) if kind == "prim::NumToTensor" else ins[0])
        elif kind == "prim::Uninitialized":
            self._set(node, None)
        elif kind in ("prim::device", "prim::layout", "prim::requires_grad", "prim::is_cuda", "prim::dtype"):
            self._set(node, _tensor_property(kind, ins[0]))
        elif kind in ("prim::min", "prim::max") and not any(isinstance(v, (Sym, Poison)) for v in leaves(ins)):
            fn = min if kind == "prim::min" else max
            self._set(node, fn(ins[0]) if len(ins) == 1 else fn(ins))
        elif kind == "prim::If":
            self._if(node, ins[0], label, position)
        elif kind == "prim::RaiseException":
            raise ModelLoadError(f"{self.source}: the model raises on inputs of shape {self.shape} "
                                 f"({first_line(Exception(ins[0]))}); pass the right input_shape")
        elif kind.startswith(("aten::", "lipsdp::")):
            self._aten(node, ins, label, position)
        else:
            t.label, t.position = label, position
            self._set(node, t.report(t.entry(kind)))

    def _if(self, node, cond, label: Label, position: int) -> None:
        t = self.t
        if isinstance(cond, Poison) or isinstance(cond, Sym):
            t.label, t.position = label, position
            self._set(node, t.report(t.entry("control flow that depends on the input")) if isinstance(cond, Sym)
                      else Poison())
            return
        block = list(node.blocks())[0 if bool(cond) else 1]
        self.walk(list(block.nodes()))
        outs = [self.env.get(v.unique()) for v in block.outputs()]
        for o, v in zip(node.outputs(), outs):
            self.env[o.unique()] = v

    def _aten(self, node, ins: list, label: Label, position: int) -> None:
        import torch

        t = self.t
        name = node.kind().split("::", 1)[1]
        symbolic = any(isinstance(v, (Sym, Poison)) for v in leaves(ins))
        if not symbolic and name in _PYTHON_OPS and not any(isinstance(v, torch.Tensor) for v in ins):
            self._set(node, _PYTHON_OPS[name](*ins))
            return
        schema = node.schema()
        if schema == "(no schema)":
            t.label, t.position = label, position
            self._set(node, t.report(t.entry(name)))
            return
        parsed = torch._C.parse_schema(schema)
        namespace, op_name = parsed.name.split("::", 1)
        op = getattr(getattr(getattr(torch.ops, namespace), op_name), parsed.overload_name or "default")
        result = t.call(op, ins, label, position)
        self._set(node, result)
        if name.endswith("_") and not name.startswith("_") and node.inputsSize():
            self.env[node.inputsAt(0).unique()] = result  # in-place: later uses see the new value

    # -- whole modules -------------------------------------------------------
    def _module_group(self, nodes: list, start: int, scopes: list):
        for depth, (_, cls) in enumerate(scopes):
            if layer_kind(cls) in MODULE_HANDLERS:
                path = ".".join(n for n, _ in scopes[:depth + 1])
                if module_handler(self._qualified_name(path)) is None:
                    continue  # a class of the same name defined elsewhere: translated operator by operator
                members = []
                for k in range(start, len(nodes)):
                    _, other = self._label(nodes[k])
                    inside = ".".join(n for n, _ in other[:depth + 1]) == path and len(other) > depth
                    if inside:
                        members.append(k)
                    elif nodes[k].kind() not in _PURE:
                        break
                return set(members), path, layer_kind(cls)
        return None

    def _qualified_name(self, path: str) -> str:
        """The TorchScript class name (``__torch__.deel.torchlip...HouseHolder``) of the submodule at ``path``."""
        module = self.root
        try:
            for part in path.split("."):
                module = getattr(module, part)
            return module._c._type().qualified_name()
        except (AttributeError, RuntimeError):
            return ""

    def _translate_module(self, nodes: list, group, position: int) -> None:
        members, path, cls = group
        t = self.t
        member_nodes = [nodes[k] for k in sorted(members)]
        produced = set()
        for node in member_nodes:
            if node.kind() in _PURE:  # evaluate plain constants and attributes (they may be used outside)
                self._node(node, Label(path, cls), position)
            else:
                produced.update(o.unique() for o in node.outputs())
        inputs = []
        for node in member_nodes:
            if node.kind() in _PURE:
                continue
            for v in node.inputs():
                value = self.env.get(v.unique())
                if v.unique() not in produced and isinstance(value, (Sym, Poison)) and v.unique() not in inputs:
                    inputs.append(v.unique())
        member_set = set(member_nodes)
        outputs = [o for node in member_nodes if node.kind() not in _PURE for o in node.outputs()
                   if any(use.user not in member_set for use in o.uses())]
        t.label, t.position = Label(path, cls), position
        if len(inputs) != 1 or len(outputs) != 1:
            result = t.report(t.entry(f"{cls} with {len(inputs)} inputs and {len(outputs)} outputs"))
        elif isinstance(self.env[inputs[0]], Poison):
            result = Poison()
        else:
            module = self.root
            for part in path.split("."):
                module = getattr(module, part)
            params = dict(module.named_parameters(recurse=False))
            params.update(dict(module.named_buffers(recurse=False)))
            try:
                result = MODULE_HANDLERS[cls](t, self.env[inputs[0]], params)
            except Unsupported as exc:
                result = t.report(t.entry(f"{cls} {exc}"))
        for o in outputs:
            self.env[o.unique()] = result


def _as_tensor(value):
    import torch

    return value if isinstance(value, (torch.Tensor, Sym, Poison)) else torch.tensor(value)


def _tensor_property(kind: str, value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"prim::device": value.device, "prim::layout": value.layout, "prim::requires_grad": False,
                "prim::is_cuda": value.is_cuda, "prim::dtype": value.dtype}[kind]
    return {"prim::device": torch.device("cpu"), "prim::layout": torch.strided, "prim::requires_grad": False,
            "prim::is_cuda": False, "prim::dtype": torch.float32}[kind]


def _slice_list(seq, start=None, end=None, step=1):
    return seq[start:end:step]


#: TorchScript list and scalar operators with generic types, evaluated in Python.
_PYTHON_OPS = {
    "__getitem__": lambda seq, i: seq[i],
    "len": len,
    "__is__": lambda a, b: a is b,
    "__isnot__": lambda a, b: a is not b,
    "__not__": lambda a: not a,
    "slice": _slice_list,
    "list": list,
    "format": lambda fmt, *args: fmt.replace("{}", "%s") % args if fmt.count("{}") == len(args) else fmt,
    "warn": lambda *args: None,
    "__contains__": lambda seq, item: item in seq,
    "add": operator.add,  # also list concatenation
    "mul": operator.mul,  # also list repetition
}
