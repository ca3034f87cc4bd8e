"""``torch.export`` programs (``.pt2`` files and exported ``nn.Module``) -> :class:`~lipsdp.network.Network`.

The program's ATen graph is walked in order; every operator goes through the
shared table of :mod:`lipsdp.io.aten_ops`.  Each node's ``nn_module_stack``
names the user's layer in error messages and lets whole modules listed in
:data:`~lipsdp.io.aten_ops.MODULE_HANDLERS` (deel-torchlip ``HouseHolder``) be
read from their parameters instead of their operators.
"""

from __future__ import annotations

import operator

from lipsdp.errors import ModelLoadError
from lipsdp.io.aten_ops import MODULE_HANDLERS, Poison, Translator, leaves, module_handler
from lipsdp.io.batch_axis import time_first_program, wrap
from lipsdp.io.folding import Float64Translator
from lipsdp.io.formats import first_line
from lipsdp.io.builder import GraphBuilder, Label, Sym, Unsupported, layer_kind


def load_exported(path: str, input_shape=None):
    """Read a ``torch.export.save`` file and translate it."""
    import torch

    import lipsdp.nn  # noqa: F401  (needs torch; registers torch.ops.lipsdp.equilibrium, which programs may call)

    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the torch.export program ({type(exc).__name__}: "
                             f"{first_line(exc)})") from exc
    return network_from_exported(program, source=path, input_shape=input_shape)


def network_from_exported(program, source: str = "", input_shape=None):
    """Translate a ``torch.export.ExportedProgram`` whose single tensor input is the network input.

    Parameters
    ----------
    program : torch.export.ExportedProgram
    source : str
        Name used in messages.
    input_shape : tuple of int, optional
        If given, must match the traced input shape (without batch axis).

    Returns
    -------
    Network
        Validated.
    """
    import torch

    signature = program.graph_signature
    state = dict(program.state_dict)
    lifted, tensor_input = _inputs(program, state, source)
    shape = [_concrete(s) for s in tensor_input.meta["val"].shape]
    if len(shape) < 2:
        raise ModelLoadError(f"{source}: the input has shape {tuple(shape)}; expected a batch axis "
                             "followed by the sample shape")
    axis = 1 if time_first_program(program) else 0  # nn.RNN(batch_first=False): (T, batch, n)
    batch, sample = shape[axis], tuple(shape[:axis] + shape[axis + 1:])
    if input_shape is not None and tuple(input_shape) != sample:
        raise ModelLoadError(f"{source}: the program was exported for inputs of shape {sample}, "
                             f"not {tuple(input_shape)}; export it again with that shape")

    builder = GraphBuilder(source)
    t = Float64Translator(builder, batch)  # parameter-only subgraphs folded in float64
    env: dict = {}
    nodes = list(program.graph_module.graph.nodes)
    skip: set = set()
    output = None
    for position, node in enumerate(nodes):
        if node in skip:
            continue
        if node.op == "placeholder":
            if node is tensor_input:
                env[node] = wrap(builder.input(sample, name=node.name), axis)
            elif node.name in lifted:
                env[node] = lifted[node.name]
            else:
                env[node] = node.meta.get("val")
        elif node.op == "get_attr":
            env[node] = _get_attr(program.graph_module, node.target)
        elif node.op == "call_function":
            group = _module_group(nodes, position)
            if group is not None:
                skip.update(group[0])
                _translate_module(t, group, env, state, position)
                continue
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
            env[node] = _call(t, node.target, args, kwargs, _label(node), position)
        elif node.op == "output":
            output = torch.fx.node.map_arg(node.args[0], lambda n: env[n])
    return _finish(t, builder, output, signature, source)


def _inputs(program, state: dict, source: str):
    """``(lifted, tensor_input)``: the values of the lifted parameters, buffers and constants by
    placeholder name, and the one placeholder that is the network input."""
    from torch.export.graph_signature import InputKind

    constants = dict(getattr(program, "constants", {}) or {})
    lifted = {}
    user_inputs = []
    for spec in program.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            user_inputs.append(name)
        elif spec.target in state:
            lifted[name] = state[spec.target]
        elif spec.target in constants:
            lifted[name] = constants[spec.target]
        else:
            lifted[name] = None
    tensor_inputs = [n for n in program.graph_module.graph.nodes
                     if n.op == "placeholder" and n.name in user_inputs and _is_tensor_meta(n)]
    if len(tensor_inputs) != 1:
        raise ModelLoadError(f"{source}: the program takes {len(tensor_inputs)} tensor inputs; "
                             "lipsdp certifies models with exactly one")
    return lifted, tensor_inputs[0]


def _finish(t: Translator, builder: GraphBuilder, output, signature, source: str):
    from torch.export.graph_signature import OutputKind

    outputs = list(output) if isinstance(output, (list, tuple)) else [output]
    kinds = [spec.kind for spec in signature.output_specs]
    if len(kinds) == len(outputs):
        outputs = [o for o, k in zip(outputs, kinds) if k == OutputKind.USER_OUTPUT]
    t.raise_errors()
    if len(outputs) != 1:
        raise ModelLoadError(f"{source}: the model returns {len(outputs)} values; lipsdp certifies one output tensor")
    result = t.resolve(outputs[0])  # torch.max(x, dim).values as the output: its values
    if not isinstance(result, Sym):
        raise ModelLoadError(f"{source}: the output does not depend on the input")
    return builder.finish(result)


def _call(t: Translator, target, args, kwargs, label: Label, position: int):
    import torch

    if target is operator.getitem:
        seq, index = args
        if isinstance(seq, Poison):
            return seq
        return seq[index]
    if isinstance(target, torch._ops.OpOverload):
        return t.call(target, bind(target, args, kwargs), label, position)
    if getattr(target, "__module__", None) in ("_operator", "operator", "math", "builtins"):
        if any(isinstance(v, (Sym, Poison)) for v in leaves((args, kwargs))):
            t.label, t.position = label, position
            return t.report(t.entry(getattr(target, "__name__", str(target))))
        return target(*args, **kwargs)
    t.label, t.position = label, position
    return t.report(t.entry(getattr(target, "__name__", str(target))))


def bind(op, args, kwargs) -> list:
    """Arguments of an ``OpOverload`` call in schema order, defaults filled in."""
    values = []
    positional = list(args)
    for i, arg in enumerate(op._schema.arguments):
        if not arg.kwarg_only and i < len(positional):
            values.append(positional[i])
        elif arg.name in kwargs:
            values.append(kwargs[arg.name])
        elif arg.has_default_value():
            values.append(arg.default_value)
        else:
            values.append(None)
    return values


def _label(node) -> Label:
    """The innermost user module of ``node`` (path and class), or the node itself."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, kind in reversed(list(stack.values())):
        if path:
            return Label(str(path), _class_name(kind))
    op = getattr(node.target, "_schema", None)
    return Label(node.name, op.name.split("::")[-1] if op is not None else str(node.target))


def _class_name(kind) -> str:
    name = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
    return layer_kind(name.rsplit(".", 1)[-1])


def _module_group(nodes: list, start: int):
    """If ``nodes[start]`` opens a call of a module in ``MODULE_HANDLERS``, return ``(nodes, key, path, kind)``."""
    node = nodes[start]
    stack = node.meta.get("nn_module_stack") or {}
    for key, (path, kind) in stack.items():
        cls = _class_name(kind)
        qualified = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
        if module_handler(qualified) is not None:
            group = []
            for other in nodes[start:]:
                if other.op == "call_function" and key in (other.meta.get("nn_module_stack") or {}):
                    group.append(other)
                else:
                    break
            return group, key, str(path), cls
    return None


def _translate_module(t: Translator, group, env: dict, state: dict, position: int):
    """Translate a whole module call (``group`` from :func:`_module_group`) with its handler."""
    members, _, path, cls = group
    inside = set(members)
    inputs = []
    for node in members:
        for arg in node.all_input_nodes:
            if arg not in inside and isinstance(env.get(arg), (Sym, Poison)) and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in members if any(user not in inside for user in n.users)]
    t.label, t.position = Label(path, cls), position
    prefix = path + "."
    params = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if len(inputs) != 1 or len(outputs) != 1:
        result = t.report(t.entry(f"{cls} with {len(inputs)} inputs and {len(outputs)} outputs"))
    elif isinstance(env[inputs[0]], Poison):
        result = env[inputs[0]]
    else:
        try:
            result = MODULE_HANDLERS[cls](t, env[inputs[0]], params)
        except Unsupported as exc:
            result = t.report(t.entry(f"{cls} {exc}"))
    for node in members:
        env[node] = Poison()
    if outputs:
        env[outputs[0]] = result


def _get_attr(module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_tensor_meta(node) -> bool:
    val = node.meta.get("val")
    return hasattr(val, "shape") and hasattr(val, "dtype")


def _concrete(size) -> int:
    try:
        return int(size)
    except Exception:  # a symbolic (dynamic) size: use its hint
        hint = getattr(getattr(size, "node", None), "hint", None)
        return int(hint) if hint is not None else 1

