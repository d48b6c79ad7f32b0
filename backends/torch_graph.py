"""The torch training bridge: `TorchGraph` executes an ONNX graph with torch ops, so it can be trained.

It is an interpreter of the graph, not a converter: its parameters *are* the graph's initializers,
and `export()` writes their current values back 1:1 into a copy of the same graph.

    tg = TorchGraph(model).train()              # ModelProto or path
    loss = tg(x).square().mean(); loss.backward()
    opt.step(); trained = tg.export()           # same graph, new initializer values

- Float initializers that act as weights become `nn.Parameter`s (`param_names`: initializer ->
  attribute). Integer/bool initializers, those read as shapes/axes/indices/bounds/exponents,
  BatchNorm running statistics, unused ones, 1-element constants that only feed elementwise
  math (epsilons, attention scales) and tensors holding -inf or nan (attention masks) become
  buffers (`buffer_names`). `Constant` nodes stay constants.
- `value_hooks` ({value name: fn(tensor) -> tensor}) run right after the node producing the value
  (on a graph input or constant: when it is read); `weight_hooks` ({initializer name: fn}) run when
  the weight is read, so `fn` may apply a differentiable mask. Both are plain dicts, changeable
  between calls; the stored weights are not modified by them.
- Like any nn.Module it starts in train mode. Train: BatchNormalization uses batch statistics and
  updates its running statistics in place (ONNX momentum m -> torch's 1 - m; the running variance
  is the unbiased one, as in torch), Dropout is active. Eval: running statistics, no dropout.
- If, Loop and Scan run their bodies as step lists of their own (the branch the condition picks;
  the iterations with carried values and scan outputs; a Scan's slices of its inputs along their
  scan axes, either way, and its outputs stacked on theirs); a body reads the enclosing graph's values
  and weights as the node's step hands them over, so weights read only inside a branch train
  too. Sequences are Python lists. Value hooks do not reach values inside a body.
- The execution plan (steps with resolved slots, parsed attributes, constant shapes read once,
  where each activation is released after its last reader) is built at construction, and so is
  every error: an op the bridge cannot run is a UserError naming the op types and nodes.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from onnx_prune.errors import UserError
from onnx_prune.passes.graph import FLOAT_TYPES, all_nodes, op_label, subgraphs

from .torch_ops import DTYPES, ELEMENTWISE, host, op_for, parse_attributes

_NONE, _TRASH = 0, 1  # slots: an omitted optional input (always None); an output nobody reads


HALF_DTYPES = (torch.float16, torch.bfloat16)  # weights trained through a float32 master copy


class TorchGraph(nn.Module):
    """An nn.Module executing an ONNX graph: forward(*inputs, **named_inputs) takes tensors for the
    graph inputs (graph order, or by name) and returns the output, or a tuple of them."""

    def __init__(self, model, value_hooks: dict | None = None, weight_hooks: dict | None = None):
        super().__init__()
        model = _as_model(model)
        self.value_hooks = dict(value_hooks or {})
        self.weight_hooks = dict(weight_hooks or {})
        self._ctx = {"training": self.training, "device": torch.device("cpu")}
        graph, inits, nodes, attrs = _parsed(model)
        self._opsets = _opsets(model)
        self.input_names = _graph_inputs(graph, inits)
        self.output_names = [v.name for v in graph.output]
        for a in attrs:
            a["_ctx"] = self._ctx
        every = _with_bodies(nodes, attrs, self._opsets)  # the bodies' nodes too
        _check_supported(every, inits)
        self._slots = {"": _NONE}
        self._template = [None, None]
        self.param_names, self.buffer_names = {}, {}
        self._consts = []  # (slot, attribute name, is parameter, dtype to run in), filled at every forward
        self._const_of = {}  # slot -> (attribute name, is parameter, dtype to run in or None)
        self._run_as = {}  # parameter kept in float32 -> the half type the graph computes in
        self._body_slots = set()  # values made inside If, Loop and Scan bodies, where no value hook runs
        self._register_initializers(model.graph.initializer, [node for node, _ in every])
        self._input_slots = [self._slot(name) for name in self.input_names]
        self._steps = self._compile(nodes, attrs)
        self._output_slots = [self._slots[name] for name in self.output_names]
        self._skeleton = _without_initializer_data(model)

    # ------------------------------------------------------------ public API

    def forward(self, *inputs, **named_inputs):
        env = self._template.copy()
        for slot, value in zip(self._input_slots, self._bind(inputs, named_inputs)):
            env[slot] = value
        params, buffers = self._parameters, self._buffers
        for slot, key, is_param, run_as in self._consts:
            value = params[key] if is_param else buffers[key]
            env[slot] = value if run_as is None else value.to(run_as)
        hooks = self._apply_read_hooks(env)
        for fn, a, ins, outs, free in self._steps:
            results = fn(a, [env[i] for i in ins])
            for slot, value in zip(outs, results):
                env[slot] = value
            if hooks:
                for slot in outs:
                    if slot in hooks:
                        env[slot] = hooks[slot](env[slot])
            for slot in free:  # the last reader has run: let the tensor go
                env[slot] = None
        outputs = tuple(env[slot] for slot in self._output_slots)
        return outputs[0] if len(outputs) == 1 else outputs

    def export(self) -> onnx.ModelProto:
        """A copy of the graph with every initializer set to the current parameter/buffer value."""
        model = onnx.ModelProto()
        model.CopyFrom(self._skeleton)
        names = {**self.param_names, **self.buffer_names}
        with torch.no_grad():
            for t in model.graph.initializer:
                if t.name in names:
                    _write(t, self.tensor(t.name))
        return model

    def parameters_by_initializer(self) -> dict[str, nn.Parameter]:
        """{initializer name: its trainable parameter}."""
        return {name: self._parameters[attr] for name, attr in self.param_names.items()}

    def tensor(self, initializer: str) -> torch.Tensor:
        """The current value (parameter or buffer) of an initializer."""
        if initializer in self.param_names:
            return self._parameters[self.param_names[initializer]]
        if initializer in self.buffer_names:
            return self._buffers[self.buffer_names[initializer]]
        raise KeyError(f"no initializer named {initializer!r}")

    def train(self, mode: bool = True):
        super().train(mode)
        self._ctx["training"] = mode  # read by BatchNormalization and Dropout
        return self

    def extra_repr(self) -> str:
        return f"{len(self._steps)} nodes, inputs={self.input_names}, outputs={self.output_names}"

    # ------------------------------------------------------------ construction

    def _slot(self, name: str) -> int:
        if name not in self._slots:
            self._slots[name] = len(self._template)
            self._template.append(None)
        return self._slots[name]

    def _register_initializers(self, initializers, nodes):
        uses = {}
        for node in nodes:  # a branch's conv reads its weight too
            for pos, name in enumerate(node.input):
                uses.setdefault(name, []).append((node.op_type, node.domain, pos))
        taken = set()
        for t in initializers:
            if t.data_type not in DTYPES:
                continue  # kept verbatim (only unused ones reach here, see _check_supported)
            value = _to_torch(t)
            if _trainable(t, uses.get(t.name, []), value):
                attr = _attribute_name("p_", t.name, taken, self)
                if value.dtype in HALF_DTYPES:  # a float32 master copy: Adam's steps underflow in half
                    self._run_as[attr] = value.dtype
                    value = value.float()
                self.register_parameter(attr, nn.Parameter(value))
                self.param_names[t.name] = attr
            else:
                attr = _attribute_name("b_", t.name, taken, self)
                self.register_buffer(attr, value)
                self.buffer_names[t.name] = attr
            self._add_const(t.name, attr, t.name in self.param_names)
        self._taken = taken

    def _compile(self, nodes, attrs) -> list:
        """Steps (fn, attrs, input slots, output slots, slots to free), in execution order."""
        host_slots = {}
        steps = [self._step(node, a, host_slots) for node, a in zip(nodes, attrs)]
        return self._with_frees([step for step in steps if step is not None])

    def _step(self, node, a, host_slots) -> tuple | None:
        """(fn, attrs, input slots, output slots) of one node; None for a Constant (a buffer)."""
        if _is_control_flow(node):
            return self._control_flow_step(node, a)
        fn = op_for(node.op_type, node.domain)
        if node.op_type == "Constant":
            self._constant(node, fn, a)
            return None
        ins = []
        for pos, name in enumerate(node.input):
            if pos in getattr(fn, "host", ()) and self._is_const(name):
                if name not in host_slots:  # read once, here, not at every forward
                    host_slots[name] = self._slot("\0host:" + name)
                    self._template[host_slots[name]] = host(self._const_value(name))
                ins.append(host_slots[name])
            else:
                ins.append(self._slots[name])
        outs = [self._slot(name) if name else _TRASH for name in node.output]
        return fn, a, ins, outs

    def _control_flow_step(self, node, a) -> tuple:
        """If, Loop and Scan: each body compiled to steps of its own, run by `_run_if`, `_run_loop` or
        `_run_scan`. The step reads the node's inputs, then every value of the enclosing graphs its
        bodies read."""
        bodies = [self._body(a[name]) for name in (("then_branch", "else_branch") if node.op_type == "If" else ("body",))]
        outer = sorted({slot for body in bodies for slot in body.outer})
        for body in bodies:
            body.outer = outer  # one order for the values the step hands over
        ins = [self._slots[name] for name in node.input] + outer
        outs = [self._slot(name) if name else _TRASH for name in node.output]
        run = {"If": _run_if, "Loop": _run_loop, "Scan": _run_scan}[node.op_type]
        return functools.partial(run, tuple(bodies)), a, ins, outs

    def _body(self, graph) -> "_Body":
        """A subgraph's steps, in graph order (where nodes of a valid body already are); its
        Constants and initializers are constants of the module (not trained), read by the step."""
        inputs = [self._slot(v.name) for v in graph.input]
        for t in graph.initializer:
            attr = _attribute_name("c_", t.name, self._taken, self)
            self.register_buffer(attr, _to_torch(t), persistent=False)
            self._add_const(t.name, attr, False)
        host_slots, steps = {}, []
        for node in graph.node:
            step = self._step(node, {**_attributes(node, self._opsets), "_ctx": self._ctx}, host_slots)
            if step is not None:
                steps.append(step)
        outputs = [self._slots[v.name] for v in graph.output]
        made = set(inputs) | {slot for _, _, _, outs in steps for slot in outs}
        self._body_slots |= made
        read = {slot for _, _, ins, _ in steps for slot in ins} | set(outputs)
        # host slots hold Python values set at construction, in the template, not the environment
        outer = {slot for slot in read - made - {_NONE, _TRASH} if self._template[slot] is None}
        hosts = {slot: self._template[slot] for slot in read - made if self._template[slot] is not None}
        return _Body(inputs, steps, outputs, sorted(outer), hosts)

    def _constant(self, node, fn, a):
        value = fn(a, [])[0]
        attr = _attribute_name("c_", node.output[0], self._taken, self)
        self.register_buffer(attr, value, persistent=False)
        self._add_const(node.output[0], attr, False)

    def _add_const(self, name: str, attr: str, is_param: bool):
        slot = self._slot(name)
        self._const_of[slot] = (attr, is_param, self._run_as.get(attr) if is_param else None)
        self._consts.append((slot,) + self._const_of[slot])

    def _is_const(self, name: str) -> bool:
        return self._slots.get(name) in self._const_of

    def _const_value(self, name: str) -> torch.Tensor:
        key, is_param, run_as = self._const_of[self._slots[name]]
        value = self._parameters[key] if is_param else self._buffers[key]
        return value if run_as is None else value.to(run_as)

    def _with_frees(self, steps) -> list:
        activations = set(self._input_slots)
        for _, _, _, outs in steps:
            activations.update(outs)
        keep = {self._slots[name] for name in self.output_names} | {_NONE, _TRASH}
        last = {}
        for i, (_, _, ins, outs) in enumerate(steps):
            for slot in outs:
                last.setdefault(slot, i)  # an output nobody reads is freed right away
            for slot in ins:
                last[slot] = i
        frees = [[] for _ in steps]
        for slot, i in last.items():
            if slot in activations and slot not in keep:
                frees[i].append(slot)
        return [(fn, a, ins, outs, frees[i]) for i, (fn, a, ins, outs) in enumerate(steps)]

    # ------------------------------------------------------------ forward helpers

    def _bind(self, inputs, named) -> list:
        n = len(self.input_names)
        if len(inputs) > n:
            raise TypeError(f"graph takes {n} input(s) ({', '.join(self.input_names)}), got {len(inputs)}")
        values = list(inputs) + [None] * (n - len(inputs))
        for name, value in named.items():
            if name not in self.input_names:
                raise TypeError(f"unknown graph input {name!r} (inputs: {', '.join(self.input_names)})")
            i = self.input_names.index(name)
            if values[i] is not None:
                raise TypeError(f"graph input {name!r} given twice")
            values[i] = value
        missing = [name for name, v in zip(self.input_names, values) if v is None]
        if missing:
            raise TypeError(f"missing graph input(s): {', '.join(missing)}")
        device = self._device()
        values = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=device) for v in values]
        self._ctx["device"] = values[0].device if values else device
        return values

    def _device(self) -> torch.device:
        for t in self._buffers.values():
            return t.device
        for t in self._parameters.values():
            return t.device
        return torch.device("cpu")

    def _apply_read_hooks(self, env) -> dict | None:
        """Weight hooks and hooks on graph inputs now; returns {slot: hook} for node outputs."""
        for name, fn in self.weight_hooks.items():
            if name not in self.param_names and name not in self.buffer_names:
                raise UserError(f"weight hook on {name!r}, which is not an initializer of the graph")
            slot = self._slots[name]
            env[slot] = fn(env[slot])
        if not self.value_hooks:
            return None
        hooks = {}
        for name, fn in self.value_hooks.items():
            slot = self._slots.get(name)
            if slot is None or name == "":
                raise UserError(f"value hook on {name!r}, which is not a value the graph computes")
            if slot in self._body_slots:
                raise UserError(f"value hook on {name!r}, a value inside an If, Loop or Scan body, where hooks do not run")
            if env[slot] is not None:  # an input or a constant: already there
                env[slot] = fn(env[slot])
            else:
                hooks[slot] = fn
        return hooks


# ---------------------------------------------------------------- control flow

CONTROL_FLOW = ("If", "Loop", "Scan")  # run by the graph itself: their bodies are graphs of steps


def _is_control_flow(node) -> bool:
    return node.op_type in CONTROL_FLOW and node.domain in ("", "ai.onnx")


class _Body:
    """A compiled subgraph: its input slots, steps, output slots, and the slots of the enclosing
    graphs it reads (`outer`, in the order its step hands them over; `hosts`: Python values)."""

    def __init__(self, inputs, steps, outputs, outer, hosts):
        self.inputs, self.steps, self.outputs, self.outer, self.hosts = inputs, steps, outputs, outer, hosts

    def run(self, outer_values, inputs=()) -> list:
        env = dict(self.hosts)
        env.update(zip(self.outer, outer_values))
        env.update(zip(self.inputs, inputs))
        env[_NONE] = None
        for fn, a, ins, outs in self.steps:
            for slot, value in zip(outs, fn(a, [env.get(i) for i in ins])):
                env[slot] = value
        return [env[slot] for slot in self.outputs]


def _run_if(bodies, a, x):
    then_branch, else_branch = bodies
    return (then_branch if bool(x[0]) else else_branch).run(x[1:])


def _run_loop(bodies, a, x):
    """ONNX Loop: (trip count M, condition, carried values...) -> final carried values, then each
    scan output stacked over the iterations. Either bound may be omitted (None)."""
    (body,) = bodies
    n_carried = len(body.inputs) - 2
    trips, cond, carried, outer = x[0], x[1], list(x[2:2 + n_carried]), x[2 + n_carried:]
    limit = None if trips is None else int(torch.as_tensor(trips).reshape(-1)[0])  # a scalar, or one element
    going = True if cond is None else bool(cond)
    scans, i = [[] for _ in body.outputs[1 + n_carried:]], 0
    device = a["_ctx"]["device"]
    while going and (limit is None or i < limit):
        flag = torch.tensor(going, device=device)
        out = body.run(outer, [torch.tensor(i, dtype=torch.int64, device=device), flag] + carried)
        going, carried = bool(out[0]), out[1:1 + n_carried]
        for values, value in zip(scans, out[1 + n_carried:]):
            values.append(value)
        i += 1
    return carried + [torch.stack(values) if values else torch.empty(0, device=device) for values in scans]


def _run_scan(bodies, a, x):
    """ONNX Scan (opset 9 on): (states..., scan inputs...) -> final states, then each scan output.
    Step t reads every scan input's slice t along its axis (from the end where its direction is 1)
    and the states; its output slices are stacked along each output's axis (in reverse order where
    that direction is 1)."""
    (body,) = bodies
    m = a["num_scan_inputs"]
    n_states = len(body.inputs) - m
    states, inputs, outer = list(x[:n_states]), x[n_states:n_states + m], x[n_states + m:]
    in_axes = _scan_list(a, "scan_input_axes", m)
    in_reversed = _scan_list(a, "scan_input_directions", m)
    in_axes = [axis % t.dim() for axis, t in zip(in_axes, inputs)]
    length = inputs[0].shape[in_axes[0]] if inputs else 0
    if any(t.shape[axis] != length for axis, t in zip(in_axes, inputs)):
        raise ValueError(f"Scan: scan inputs of different lengths along their axes {in_axes}")
    slices = [list(torch.unbind(t, axis)) for axis, t in zip(in_axes, inputs)]
    slices = [s[::-1] if rev else s for s, rev in zip(slices, in_reversed)]
    scans = [[] for _ in body.outputs[n_states:]]
    for t in range(length):
        out = body.run(outer, states + [s[t] for s in slices])
        states = out[:n_states]
        for values, value in zip(scans, out[n_states:]):
            values.append(value)
    k = len(scans)
    out_axes = _scan_list(a, "scan_output_axes", k)
    out_reversed = _scan_list(a, "scan_output_directions", k)
    stacked = [torch.stack(values[::-1] if rev else values, axis % (values[0].dim() + 1))
               for values, axis, rev in zip(scans, out_axes, out_reversed)]
    return states + stacked


def _scan_list(a, name, n) -> list:
    """One of Scan's per-input or per-output attributes (axes, directions); absent, 0 for each."""
    values = a.get(name)
    return [0] * n if values is None else [int(v) for v in values]


# ---------------------------------------------------------------- module-level helpers


def _as_model(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, Path)):
        try:
            return onnx.load(str(model))
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
            raise UserError(f"cannot load ONNX model {model}: {exc}") from exc
    raise UserError(f"TorchGraph needs an onnx.ModelProto or a path, got {type(model).__name__}")


def _inlined(model) -> onnx.ModelProto:
    """Local functions inlined for execution (export keeps the original graph)."""
    if not len(model.functions):
        return model
    from onnx import inliner

    return inliner.inline_local_functions(model)


def _outer_reads(graph) -> set:
    """Names a subgraph (its nested ones too) reads from the graphs around it."""
    made = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    read = {v.name for v in graph.output}
    for node in graph.node:
        read.update(_reads(node))
        made.update(node.output)
    return read - made - {""}


def _reads(node) -> list:
    """A node's inputs, then what its subgraphs read from around them (an If's branch reads a
    weight no input names)."""
    return list(node.input) + sorted(set().union(*map(_outer_reads, subgraphs(node))) - set(node.input))


def _live_nodes(graph, inits, inputs) -> list:
    """The nodes the outputs depend on, in an order where every value is produced before use."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    live, stack = set(), [v.name for v in graph.output]
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in live:
            live.add(i)
            stack.extend(name for name in _reads(graph.node[i]) if name)
    known = set(inits) | set(inputs)
    order, pending = [], [graph.node[i] for i in sorted(live)]
    while pending:  # graph order is topological in valid models: one pass; more only to repair others
        waiting = []
        for node in pending:
            if all(not name or name in known for name in _reads(node)):
                order.append(node)
                known.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            missing = sorted({name for n in waiting for name in _reads(n) if name and name not in producer
                              and name not in known})
            raise UserError(f"graph uses value(s) nothing produces: {', '.join(missing[:5]) or 'a cycle'}")
        pending = waiting
    for name in (v.name for v in graph.output):
        if name not in known:
            raise UserError(f"graph output {name!r} is never produced")
    return order


def _graph_inputs(graph, inits) -> list[str]:
    return [v.name for v in graph.input if v.name not in inits]


def _parsed(model: onnx.ModelProto):
    """(inlined graph, initializers by name, the nodes the outputs need in execution order, their
    attributes with the op's opset and output count)."""
    graph = _inlined(model).graph
    inits = {t.name: t for t in model.graph.initializer}
    nodes = _live_nodes(graph, inits, _graph_inputs(graph, inits))
    opsets = _opsets(model)
    return graph, inits, nodes, [_attributes(node, opsets) for node in nodes]


def _opsets(model) -> dict:
    return {(o.domain or "ai.onnx"): o.version for o in model.opset_import}


def _attributes(node, opsets: dict) -> dict:
    return {**parse_attributes(node), "_opset": opsets.get(node.domain or "ai.onnx", 0), "_nout": len(node.output)}


def _with_bodies(nodes, attrs, opsets: dict) -> list:
    """(node, attributes) of the nodes, each followed by every node of its subgraphs (nested ones too)."""
    return [pair for node, a in zip(nodes, attrs)
            for pair in [(node, a)] + [(n, _attributes(n, opsets)) for g in subgraphs(node) for n in all_nodes(g)]]


def check_bridge(model: onnx.ModelProto, sample: dict | None = None):
    """What building a TorchGraph checks first (every op runnable): a UserError naming the ops it
    cannot run. With `sample` (one batch of inputs), also one run of it, so that what only real
    inputs show (a recurrent layer's shorter sequence_lens) stops a compile before its search."""
    _graph, inits, nodes, attrs = _parsed(model)
    _check_supported(_with_bodies(nodes, attrs, _opsets(model)), inits)
    if sample is not None:
        with torch.no_grad():
            TorchGraph(model).eval()(**{k: torch.from_numpy(np.asarray(v)) for k, v in sample.items()})


RANDOM_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial")


def _check_supported(every, inits):
    """UserError naming every op (and node) the bridge cannot run, before anything runs; `every`:
    (node, attributes) of the graph's nodes and of its If, Loop and Scan bodies' (`_with_bodies`)."""
    drawn = [n for n, _ in every if n.op_type in RANDOM_OPS and n.domain in ("", "ai.onnx")]
    if drawn:  # nothing to add to the op table: the dense model's targets are other draws
        raise UserError(f"the model draws random values ({drawn[0].op_type}, node {drawn[0].name or drawn[0].output[0]}): "
                        "its outputs change from run to run, so training through the torch bridge has no fixed "
                        "target; use --recover layer")
    problems = {}
    for node, a in every:
        fn = op_for(node.op_type, node.domain)
        label = op_label(node)
        reason = None
        if _is_control_flow(node):
            if node.op_type == "Scan" and a["_opset"] < 9:
                # opset 8's Scan: a batch axis first and a sequence_lens input
                problems.setdefault(label, []).append(f"{node.name or node.output[0]}: opset 8's batched form")
            continue  # its body's nodes are checked in turn
        if fn is not None:
            reason = fn.check(a) if getattr(fn, "check", None) else None
            nout = getattr(fn, "nout", 1)
            used = [i for i, name in enumerate(node.output) if name]
            if reason is None and nout is not None and used and max(used) >= nout:
                reason = f"output {max(used)}"
        for name in node.input:
            if name in inits and inits[name].data_type not in DTYPES:
                reason = f"initializer {name} of type {onnx.TensorProto.DataType.Name(inits[name].data_type)}"
        if fn is None or reason:
            where = node.name or node.output[0]
            problems.setdefault(label, []).append(f"{where}: {reason}" if reason else where)
    if problems:
        items = [f"{op} (node{'s' if len(ns) > 1 else ''} {', '.join(ns[:3])}{', ...' if len(ns) > 3 else ''})"
                 for op, ns in problems.items()]
        raise UserError(f"torch bridge cannot run op(s) {'; '.join(items)}; "
                        "use --recover layer, or add them to onnx_prune.backends.torch_ops")


def _trainable(t: onnx.TensorProto, uses, value: torch.Tensor) -> bool:
    if t.data_type not in FLOAT_TYPES or not uses:
        return False
    if not torch.isfinite(value).all():
        # an additive attention mask of -inf folded into a constant (a causal scaled_dot_product_attention):
        # trained, -inf - -inf = nan in global AdaPrune's running mean of the weights
        return False
    for op, domain, pos in uses:
        fn = op_for(op, domain)
        if pos in getattr(fn, "host", ()) or pos in getattr(fn, "frozen", ()):
            return False
    # a scalar operand of elementwise math is a constant (epsilon, scale), not a weight
    return not (math.prod(t.dims) <= 1 and all(op in ELEMENTWISE for op, _, _ in uses))


def _attribute_name(prefix: str, name: str, taken: set, module: nn.Module) -> str:
    attr = prefix + re.sub(r"\W", "_", name)
    while attr in taken or hasattr(module, attr):
        attr += "_"
    taken.add(attr)
    return attr


def _to_torch(t: onnx.TensorProto) -> torch.Tensor:
    array = numpy_helper.to_array(t)
    if t.data_type == onnx.TensorProto.BFLOAT16:
        return torch.from_numpy(np.array(array.view(np.uint16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, dtype=array.dtype))  # a writable copy


def _write(t: onnx.TensorProto, value: torch.Tensor):
    dtype = DTYPES[t.data_type]
    value = value.detach().to("cpu", dtype)
    if tuple(value.shape) != tuple(t.dims):
        raise ValueError(f"initializer {t.name}: shape changed from {tuple(t.dims)} to {tuple(value.shape)}")
    if dtype == torch.bfloat16:
        value = value.view(torch.int16)
    t.raw_data = value.contiguous().numpy().tobytes()


_DATA_FIELDS = frozenset({"raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                          "string_data", "external_data", "data_location"})


def _copy_fields(dst, src, skip):
    """Copy the fields present in `src` (presence kept exactly, so bytes round-trip) except `skip`."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if hasattr(value, "extend"):
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _without_initializer_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer reduced to its header (name, type, dims), to refill on export;
    initializers torch cannot hold are kept whole. Avoids holding a second copy of the weights."""
    skeleton = onnx.ModelProto()
    _copy_fields(skeleton, model, {"graph"})
    _copy_fields(skeleton.graph, model.graph, {"initializer"})
    for t in model.graph.initializer:
        out = skeleton.graph.initializer.add()
        if t.data_type in DTYPES:
            _copy_fields(out, t, _DATA_FIELDS)
        else:
            out.CopyFrom(t)
    return skeleton
