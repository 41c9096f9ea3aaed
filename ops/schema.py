"""The ops' default arguments, read from the schemas registered in C++ (csrc/schemas.cpp).

The schema is the one place a default is written; the modules, the reference
ops and the telemetry wrapper take theirs from here, so they cannot drift.
"""

import torch


def _defaults(op_name):
    schema = getattr(torch.ops.ffn, op_name).default._schema
    return {arg.name: arg.default_value for arg in schema.arguments if arg.has_default_value()}


def op_default(op_name, arg):
    """The default of argument `arg` of torch.ops.ffn.<op_name>, as its schema declares it."""
    try:
        return _defaults(op_name)[arg]
    except KeyError:
        raise KeyError(f"torch.ops.ffn.{op_name} has no argument {arg!r} with a default") from None
