"""One name per operation, whatever form the FX graph spells it in.

Dynamo graphs call ``torch.matmul`` / ``operator.mul`` / ``Tensor.transpose`` methods,
``torch._C._nn.scaled_dot_product_attention``; ``make_fx`` graphs call ``aten`` ops.
:func:`op_of` maps all of them to one short name (``"matmul"``, ``"mul"``,
``"transpose"``, ``"sdpa"`` ...) so the matcher's rules are written once.
In-place arithmetic (``s /= c``, ``s.mul_(c)``) is ``"idiv"`` / ``"imul"``: only the
score rules, which check that the operand has no other use, accept it (the mask
recovery does not model it); :func:`rebind_inplace` makes later readers of a tensor
mutated in place read the in-place op's result (the same tensor), so ``s.div_(c)``
without ``s = ...`` is a chain step too.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

_FUNCTIONS = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    operator.floordiv: "floordiv", operator.mod: "mod", operator.neg: "neg", operator.getitem: "getitem",
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt", operator.eq: "eq", operator.ne: "ne",
    operator.and_: "and", operator.or_: "or", operator.invert: "not", operator.matmul: "matmul",
    torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div", torch.true_divide: "div",
    torch.floor_divide: "floordiv", torch.remainder: "mod", torch.neg: "neg",
    operator.itruediv: "idiv", operator.imul: "imul",
    torch.le: "le", torch.lt: "lt", torch.ge: "ge", torch.gt: "gt", torch.eq: "eq", torch.ne: "ne",
    torch.logical_and: "and", torch.logical_or: "or", torch.logical_not: "not", torch.bitwise_and: "and",
    torch.bitwise_or: "or", torch.bitwise_not: "not", torch.abs: "abs", torch.maximum: "maximum",
    torch.minimum: "minimum",
    torch.matmul: "matmul", torch.bmm: "matmul", torch.tanh: "tanh", torch.sigmoid: "sigmoid",
    torch.softmax: "softmax", F.softmax: "softmax", torch.nn.functional.dropout: "dropout",
    torch.dropout: "dropout", torch.transpose: "transpose", torch.permute: "permute",
    torch.cat: "cat", torch.concat: "cat", torch.where: "where", torch.arange: "arange",
    torch.reshape: "reshape", torch.unsqueeze: "unsqueeze", torch.squeeze: "squeeze",
    torch.repeat_interleave: "repeat_interleave",
    torch.max: "max", torch.amax: "amax", torch.tensor: "tensor", torch.zeros: "zeros", torch.ones: "ones",
    torch.full: "full", torch.clone: "clone", getattr: "getattr",
    F.embedding: "embedding", operator.iadd: "iadd", torch.baddbmm: "baddbmm", torch.flatten: "flatten", torch.unflatten: "unflatten",
    torch.cumsum: "cumsum", torch.masked_fill: "masked_fill",
    F.scaled_dot_product_attention: "sdpa", torch._C._nn.scaled_dot_product_attention: "sdpa",
}

_METHODS = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "__truediv__": "div", "neg": "neg",
    "le": "le", "lt": "lt", "ge": "ge", "gt": "gt", "eq": "eq", "ne": "ne", "__and__": "and", "__or__": "or",
    "logical_and": "and", "logical_or": "or", "logical_not": "not", "bitwise_not": "not", "__invert__": "not",
    "abs": "abs", "matmul": "matmul", "tanh": "tanh", "sigmoid": "sigmoid", "softmax": "softmax",
    "transpose": "transpose", "permute": "permute", "view": "view", "reshape": "reshape", "expand": "expand",
    "unsqueeze": "unsqueeze", "squeeze": "squeeze", "contiguous": "contiguous", "to": "to", "float": "to", "half": "to", "bool": "to",
    "bfloat16": "to", "type_as": "to", "clone": "clone", "repeat_interleave": "repeat_interleave", "max": "max",
    "amax": "amax", "new_ones": "new_ones", "new_zeros": "new_zeros", "masked_fill": "masked_fill",
    "__getitem__": "getitem", "div_": "idiv", "mul_": "imul", "__itruediv__": "idiv", "__imul__": "imul",
    "add_": "iadd", "__iadd__": "iadd", "baddbmm": "baddbmm", "bmm": "matmul", "repeat": "repeat",
    "flatten": "flatten", "unflatten": "unflatten", "cumsum": "cumsum",
}

_ATEN = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "neg": "neg", "le": "le", "lt": "lt", "ge": "ge",
    "gt": "gt", "eq": "eq", "ne": "ne", "logical_and": "and", "logical_or": "or", "logical_not": "not",
    "bitwise_and": "and", "bitwise_or": "or", "bitwise_not": "not", "abs": "abs", "bmm": "matmul",
    "matmul": "matmul", "tanh": "tanh", "sigmoid": "sigmoid", "_softmax": "softmax", "softmax": "softmax",
    "transpose": "transpose", "permute": "permute", "view": "view", "_unsafe_view": "view", "reshape": "reshape",
    "expand": "expand", "unsqueeze": "unsqueeze", "clone": "clone", "_to_copy": "to", "cat": "cat",
    "where": "where", "arange": "arange", "amax": "amax", "scaled_dot_product_attention": "sdpa",
    "baddbmm": "baddbmm", "repeat": "repeat", "cumsum": "cumsum",
}


def op_of(node: fx.Node):
    """The short op name of an FX node (``None`` for placeholders, outputs and ops the
    pass does not know)."""
    if node.op == "call_function":
        t = node.target
        try:
            if t in _FUNCTIONS:
                return _FUNCTIONS[t]
        except TypeError:  # unhashable targets
            return None
        if isinstance(t, torch._ops.OpOverload):
            return _ATEN.get(t._schema.name.split("::")[-1])
        if isinstance(t, torch._ops.OpOverloadPacket):
            return _ATEN.get(t._qualified_op_name.split("::")[-1])
        return None
    if node.op == "call_method":
        if node.target == "type":  # x.type(dtype) is a cast; x.type() a string
            return "to" if len(node.args) > 1 or "dtype" in node.kwargs else None
        return _METHODS.get(node.target)
    return None


def value_of(node):
    """The example value recorded on a node (dynamo's ``example_value``, ``make_fx``'s
    ``val``, or a :class:`~torch.fx.passes.shape_prop.TensorMetadata`), else None."""
    if not isinstance(node, fx.Node):
        return node
    for k in ("example_value", "val"):
        if k in node.meta:
            return node.meta[k]
    return None


def arg(node: fx.Node, i: int, name: str, default=None):
    """Argument ``i`` / keyword ``name`` of a call node."""
    if name in node.kwargs:
        return node.kwargs[name]
    if len(node.args) > i:
        return node.args[i]
    return default


def shape_of(node):
    """The recorded shape of a node's tensor value, or None."""
    v = value_of(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def same_size(a, b) -> bool:
    """Two sizes (ints, SymInts or sympy expressions) are provably equal."""
    sa = a.node.expr if isinstance(a, torch.SymInt) else a
    sb = b.node.expr if isinstance(b, torch.SymInt) else b
    try:
        return bool(sympy.simplify(sympy.sympify(sa) - sympy.sympify(sb)) == 0)
    except (TypeError, sympy.SympifyError):
        return False
