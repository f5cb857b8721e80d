"""From the graph of a plain Flax model (``f8net_jax.capture``) to F8Net's layers.

``make_plan`` pairs each nn.Conv with the nn.BatchNorm that reads it (one quantized layer,
named by the conv's path), finds the classifier (the nn.Dense whose output the model
returns), each layer's input kind (the image; 'unsigned' after a ReLU or a pool of one;
'signed' otherwise), and the scale plan of METHOD.md 5 by the rules of
``streams.scale_plan`` as our models apply them:

* a *stream* is a value that some layer reads; an add whose operand is a stream continues
  that stream's chain (an identity shortcut), a ReLU or pool continues its input's; every
  other value starts a chain;
* the readers of one chain share one alpha, owned by its first reader, a shortcut (a conv
  whose BatchNorm output goes straight into an add) only where no other reader is; the
  classifier owns its own unless ``share_classifier_alpha``;
* each layer delivers its output in the units of its *consumer*: the first reader (again
  shortcuts last) of the nearest stream its output flows into.

Anything F8Net's integer program cannot express between the layers is refused here,
naming its module path and the op (``Refused``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from f8net_jax.capture import Call, Graph, Node, is_power_of_two
from f8net_jax.quant_config import QuantConfig


class Refused(ValueError):
    """An op between quantized layers that F8Net's integer program cannot express."""


@dataclasses.dataclass(eq=False)
class Layer:
    """A quantized layer: a conv (+ its BatchNorm) or the classifier."""

    name: str            # the conv's (the dense's) module path: where its formats live
    conv: Call           # the nn.Conv or nn.Dense call
    bn: Optional[Call]   # the nn.BatchNorm call (None for the classifier)
    input: Node
    kind: str = "unsigned"
    owns_alpha: bool = True
    alpha_owner: Optional["Layer"] = None  # whose alpha it clips at (itself or its chain's)
    consumer: Optional["Layer"] = None     # whose units its output is delivered in
    shortcut: bool = False
    fused_relu: bool = False  # its input is a ReLU inside its own module: its quantizer's
    strides: int = 1
    padding: int = 0
    groups: int = 1
    output: Optional[Node] = None  # its BatchNorm's output (None for the classifier)

    @property
    def is_classifier(self) -> bool:
        return self.bn is None

    @property
    def module(self) -> str:
        """The path of the module whose code calls it ('' for the top level)."""
        return self.name.rpartition("/")[0]


@dataclasses.dataclass
class Plan:
    layers: list          # in call order, the classifier last
    by_path: dict         # conv, dense and BatchNorm path -> Layer
    train: bool
    refcount: dict        # id(node) -> number of nodes and layers reading it
    add_names: dict       # id(node) -> path of the module whose output it is
    image: Node
    normalizes: bool = False  # the first conv reads the model's own arithmetic on pixels

    @property
    def classifier(self) -> Layer:
        return self.layers[-1]

    def layer_of(self, call_path: str) -> Optional[Layer]:
        return self.by_path.get(call_path)


def _where(node_or_call) -> str:
    path = node_or_call.where if isinstance(node_or_call, Node) else node_or_call.path
    return f"'{path}'" if path else "the model's top level"


def _op_name(node: Node) -> str:
    if node.op == "call":
        call = node.attrs["call"]
        return f"{call.type_name} '{call.path}'"
    return node.attrs.get("op", node.op)


def _padding(call: Call) -> int:
    m, (h, w) = call.module, call.in_shape[1:3]
    k = tuple(m.kernel_size) if not isinstance(m.kernel_size, int) else (m.kernel_size,) * 2
    strides = m.strides or 1
    s = tuple(strides) if not isinstance(strides, int) else (strides,) * 2
    where = f"nn.Conv '{call.path}'"
    if len(k) != 2 or k[0] != k[1] or s[0] != s[1]:
        raise Refused(f"{where}: F8Net's convolutions are square with equal strides, got "
                      f"kernel_size {m.kernel_size} and strides {m.strides}")
    for name in ("input_dilation", "kernel_dilation"):
        d = getattr(m, name)
        if d not in (None, 1) and tuple(d) != (1, 1):
            raise Refused(f"{where}: {name} {d} is not supported")
    pad = m.padding
    if isinstance(pad, str):
        if pad.upper() == "VALID":
            return 0, int(s[0])
        if pad.upper() != "SAME":
            raise Refused(f"{where}: padding {pad!r} is not supported (zero padding only)")
        total = [max((-(-n // s[0]) - 1) * s[0] + k[0] - n, 0) for n in (h, w)]
        pairs = [(t // 2, t - t // 2) for t in total]
    elif isinstance(pad, int):
        pairs = [(pad, pad)] * 2
    else:
        pairs = [(p, p) if isinstance(p, int) else tuple(p) for p in pad]
    if len(set(pairs)) != 1 or pairs[0][0] != pairs[0][1]:
        raise Refused(f"{where}: padding {pad!r} pads {pairs} here; F8Net's convolutions "
                      f"pad symmetrically (e.g. padding={k[0] // 2})")
    return int(pairs[0][0]), int(s[0])


def _conv_layer(conv: Call, bn: Call) -> Layer:
    m = conv.module
    if m.use_bias:
        raise Refused(f"nn.Conv '{conv.path}': use_bias=True; F8Net folds the following "
                      f"BatchNorm into the conv, which has no bias of its own (use_bias=False)")
    padding, strides = _padding(conv)
    cin, cout, groups = conv.in_shape[-1], conv.out_shape[-1], m.feature_group_count
    if groups not in (1, cin) or (groups == cin and cin != cout and groups != 1):
        raise Refused(f"nn.Conv '{conv.path}': feature_group_count {groups}: F8Net has "
                      f"plain and depthwise (groups == in == out channels) convolutions")
    b = bn.module
    if b.axis not in (-1, len(bn.in_shape) - 1) or not (b.use_scale and b.use_bias):
        raise Refused(f"nn.BatchNorm '{bn.path}': F8Net folds a BatchNorm over the channel "
                      f"axis with scale and bias")
    return Layer(conv.path, conv, bn, conv.input, strides=strides, padding=padding,
                 groups=groups, output=bn.output)


def _layers(graph: Graph) -> list:
    """The conv + BN layers and the classifier, checked, in call order."""
    readers_of_conv: dict = {}
    for call in graph.calls:
        if call.kind == "bn":
            src = call.input
            if src is None or src.op != "call" or src.attrs["call"].kind != "conv":
                what = "the image" if src is not None and src.op == "image" else \
                    (_op_name(src) if src is not None else "a constant")
                raise Refused(f"nn.BatchNorm '{call.path}' follows no convolution (it reads "
                              f"{what}): F8Net folds every BatchNorm into the conv before it")
            readers_of_conv.setdefault(id(src.attrs["call"]), []).append(call)
    layers, dense = [], []
    for call in graph.calls:
        if call.kind == "conv":
            bns = readers_of_conv.get(id(call), [])
            if len(bns) != 1:
                raise Refused(f"nn.Conv '{call.path}' is read by {len(bns)} BatchNorms: an "
                              f"F8Net layer is a conv followed by exactly one BatchNorm")
            layers.append(_conv_layer(call, bns[0]))
        elif call.kind == "dense":
            dense.append(call)
    out = graph.output
    if out.op != "call" or out.attrs["call"].kind != "dense":
        raise Refused(f"the model's output is {_op_name(out)}, computed in {_where(out)}: "
                      f"an F8Net model returns the logits of its nn.Dense classifier")
    classifier = out.attrs["call"]
    for call in dense:
        if call is not classifier:
            raise Refused(f"nn.Dense '{call.path}' is not the classifier: F8Net has one "
                          f"dense layer, whose output the model returns")
    if not classifier.module.use_bias:
        raise Refused(f"nn.Dense '{classifier.path}': the classifier needs a bias")
    if len(classifier.in_shape) != 2:
        raise Refused(f"nn.Dense '{classifier.path}' reads a tensor of shape "
                      f"{classifier.in_shape}: the classifier reads the global average pool "
                      f"(N, channels)")
    layers.append(Layer(classifier.path, classifier, None, classifier.input))
    return layers


def _check_reachable(graph: Graph, layers: list) -> dict:
    """Refuses every op the layers' inputs depend on that the integer program does not
    have; returns the reference counts of the nodes."""
    refcount: dict = {}
    seen: set = set()
    stack = [layer.input for layer in layers]
    for layer in layers:
        refcount[id(layer.input)] = refcount.get(id(layer.input), 0) + 1
    readers = {id(layer.conv): layer for layer in layers}
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op == "refused":
            raise Refused(f"{_where(node)} computes {_op_name(node)!r} between quantized "
                          f"layers: F8Net's integer program has only ReLU, residual adds, "
                          f"max pooling and a global average pool over 2^n values there")
        if node.op != "pixels" and any(child.op == "pixels" for child in node.inputs):
            raise Refused(f"{_where(node)} computes {_op_name(node)!r} on the model's own "
                          f"normalization of the pixels: it must go straight into the "
                          f"first convolution")
        if node.op == "sum":
            raise Refused(f"{_where(node)}: a spatial sum that is not a mean")
        if node.op == "avg_pool" and not is_power_of_two(node.attrs["window"]):
            raise Refused(f"{_where(node)} averages over a window of {node.attrs['window']} "
                          f"values: F8Net's integer average pool shifts right by log2 of the "
                          f"window, which must be a power of two")
        if node.op == "call":
            call = node.attrs["call"]
            if call.kind == "refused":
                raise Refused(f"{call.type_name} '{call.path}' runs between quantized layers: "
                              f"F8Net's integer program cannot express it")
            if call.kind == "conv":
                raise Refused(f"the output of nn.Conv '{call.path}' is used before its "
                              f"BatchNorm: F8Net folds the BatchNorm into the conv")
            if call.kind == "dense" or id(call) in readers:
                raise Refused(f"the output of {call.type_name} '{call.path}' is read by "
                              f"another layer: F8Net's classifier is the last layer")
        for child in node.inputs:
            refcount[id(child)] = refcount.get(id(child), 0) + 1
            stack.append(child)
    return refcount


def _nonnegative(node: Node) -> bool:
    if node.op == "relu":
        return True
    if node.op in ("max_pool", "avg_pool"):
        return _nonnegative(node.inputs[0])
    return False


def _fused_relu(layer: Layer, refcount: dict) -> bool:
    """Whether the ReLU ``layer`` reads is its input quantizer's own (as inside our blocks,
    where a layer's unsigned quantizer is the ReLU after the previous layer and takes its
    format statistic before rectification, METHOD.md 5): a ReLU of a BatchNorm's output
    that only this layer reads, computed in the module holding both. A ReLU between
    modules (after a stem, at the end of a block) is an op of the stream, as ours."""
    node = layer.input
    if layer.is_classifier or node.op != "relu" or refcount.get(id(node)) != 1:
        return False
    src = node.inputs[0]
    if src.op != "call" or src.attrs["call"].kind != "bn":
        return False
    bn_module = src.attrs["call"].path.rpartition("/")[0]
    return node.where == layer.module == bn_module


def _input_kind(layer: Layer, quant: QuantConfig) -> str:
    node = layer.input
    if node.op == "image":
        if layer.is_classifier:
            raise Refused(f"nn.Dense '{layer.name}' reads the image: F8Net needs a conv first")
        return "signed" if quant.normalized_input else "image"
    if node.op == "pixels":
        if layer.is_classifier:
            raise Refused(f"nn.Dense '{layer.name}' reads the pixels: F8Net needs a conv first")
        if quant.normalized_input:
            raise Refused(f"the model normalizes its pixels itself (computing "
                          f"{node.attrs['op']!r} in {_where(node)}) and quant.normalized_input "
                          f"is set: leave it False, the program reads the model's own "
                          f"normalization as a table")
        return "signed"
    return "unsigned" if _nonnegative(node) else "signed"


class _Chains:
    """Union-find over nodes: the streams that share one clipping level."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, node: Node) -> int:
        key = id(node)
        while self.parent.get(key, key) != key:
            key = self.parent[key]
        return key

    def union(self, a: Node, b: Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _chains(layers: list, nodes: list) -> _Chains:
    streams = {id(layer.input) for layer in layers}
    chains = _Chains()
    for node in nodes:
        if node.op in ("relu", "max_pool", "avg_pool"):
            chains.union(node.inputs[0], node)
        elif node.op == "add":
            for operand in node.inputs:
                if id(operand) in streams:
                    chains.union(operand, node)
    return chains


def _nodes(layers: list) -> list:
    """Every node the layers' inputs depend on, inputs before their readers."""
    order, seen = [], set()

    def visit(node):
        if id(node) in seen:
            return
        seen.add(id(node))
        for child in node.inputs:
            visit(child)
        order.append(node)

    for layer in layers:
        visit(layer.input)
    return order


def _first(readers: list, order: dict) -> Layer:
    return min(readers, key=lambda r: (r.shortcut, order[id(r)]))


def _assign_alphas(layers, nodes, quant, order) -> None:
    chains = _chains(layers, nodes)
    members: dict = {}
    for layer in layers:
        if layer.kind == "image":
            layer.owns_alpha, layer.alpha_owner = True, layer
            continue
        if layer.is_classifier and not quant.share_classifier_alpha:
            continue
        members.setdefault(chains.find(layer.input), []).append(layer)
    owners = {root: _first(readers, order) for root, readers in members.items()}
    for layer in layers:
        if layer.kind == "image":
            continue
        if layer.is_classifier and not quant.share_classifier_alpha:
            owner = layer
        else:
            owner = owners[chains.find(layer.input)]
        layer.owns_alpha, layer.alpha_owner = owner is layer, owner


def _assign_consumers(layers, nodes, order) -> None:
    """Each conv layer's consumer: the first reader of the nearest stream its output
    reaches through the ops between layers."""
    readers: dict = {}
    for layer in layers:
        readers.setdefault(id(layer.input), []).append(layer)
    users: dict = {}
    for node in nodes:
        for child in node.inputs:
            users.setdefault(id(child), []).append(node)
    for layer in layers:
        if layer.is_classifier:
            continue
        frontier, seen = [layer.output], set()
        while frontier:
            found = [r for n in frontier for r in readers.get(id(n), [])]
            if found:
                layer.consumer = _first(found, order)
                break
            seen.update(id(n) for n in frontier)
            frontier = [u for n in frontier for u in users.get(id(n), []) if id(u) not in seen]
        if layer.consumer is None:
            raise Refused(f"the output of nn.BatchNorm '{layer.bn.path}' reaches no layer")


def make_plan(graph: Graph, quant: QuantConfig) -> Plan:
    """The layers of ``graph``, their input kinds, alphas and consumers (see the module
    docstring); raises Refused, naming the module and the op, where F8Net cannot run it."""
    layers = _layers(graph)
    refcount = _check_reachable(graph, layers)
    modes = {call.train for call in graph.calls if call.kind == "bn"}
    if len(modes) > 1:
        raise Refused("the BatchNorms of one forward mix batch and running statistics")
    order = {id(layer): i for i, layer in enumerate(layers)}
    add_of = {}
    nodes = _nodes(layers)
    for node in nodes:
        if node.op == "add":
            for operand in node.inputs:
                if operand.op == "call" and operand.attrs["call"].kind == "bn":
                    add_of[id(operand)] = node
    for layer in layers:
        layer.kind = _input_kind(layer, quant)
        layer.shortcut = layer.output is not None and id(layer.output) in add_of
        layer.fused_relu = _fused_relu(layer, refcount)
    _assign_alphas(layers, nodes, quant, order)
    _assign_consumers(layers, nodes, order)
    by_path = {layer.name: layer for layer in layers}
    by_path.update({layer.bn.path: layer for layer in layers if layer.bn is not None})
    on_pixels = [layer for layer in layers if layer.input.op in ("image", "pixels")]
    normalizes = any(layer.input.op == "pixels" for layer in on_pixels)
    if normalizes and len(on_pixels) > 1:
        raise Refused(f"{len(on_pixels)} convolutions read the model's normalization of the "
                      f"pixels ({', '.join(repr(l.name) for l in on_pixels)}): the integer "
                      f"program reads it through one table, in one layer's input format")
    return Plan(layers, by_path, bool(modes.pop()) if modes else False, refcount,
                dict(graph.container_outputs), graph.image, normalizes)
