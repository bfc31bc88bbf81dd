"""The opcode-level check every pickle passes before it is unpickled (no globals but the allowed ones, bounded resources)."""

from __future__ import annotations

import pickle
import pickletools
from typing import Any


from ._common import (
    BFLOAT16,
    MAX_INT_BITS,
    MAX_PICKLE_OPS,
    MAX_SMALL_INT,
    Refused,
    STORAGE_DTYPES,
    clip,
    error_text,
)

# --------------------------------------------------------------------------------------------
# Pickle check (before anything is unpickled)

# opcode name -> kind of the value it pushes
_LITERAL_OPS = {
    "NONE": "none", "NEWTRUE": "bool", "NEWFALSE": "bool",
    "BININT": "int", "BININT1": "int", "BININT2": "int",
    "BINFLOAT": "float",
    "BINSTRING": "str", "SHORT_BINSTRING": "str",  # Python 2 str, decoded as UTF-8 (like torch)
    "BINUNICODE": "str", "SHORT_BINUNICODE": "str", "BINUNICODE8": "str",
    "BINBYTES": "bytes", "SHORT_BINBYTES": "bytes", "BINBYTES8": "bytes",
    "EMPTY_LIST": "list", "EMPTY_DICT": "dict", "EMPTY_TUPLE": "tuple", "EMPTY_SET": "set",
}
_KEY_KINDS = {"none", "bool", "int", "str", "bytes"}  # hashable without recursion or collisions
_OBJECT_OPS = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID"}
_ALLOWED_GLOBAL_NAMES = (
    {"collections OrderedDict", "torch._utils _rebuild_tensor", "torch._utils _rebuild_tensor_v2",
     "torch._utils _rebuild_parameter", f"torch {BFLOAT16}"}
    | {f"torch {name}" for name in STORAGE_DTYPES}
)


def check_pickle(stream: Any, size_limit: int, what: str, allow_objects: bool) -> None:
    """Walk one pickle's opcodes without executing any; raise :class:`Refused` unless it is safe.

    Models the C unpickler's stack (with its marks and "fence": no opcode may pop below the last
    mark) holding the *kind* of each value, so that dict keys / set elements, ``REDUCE`` /
    ``BUILD`` operands and memo indices can be checked. Stops after ``STOP``.
    """
    stack: list[str] = []
    marks: list[int] = []
    memo: dict[int, str] = {}

    def refuse(message: str, pos: Any) -> Refused:
        return Refused(f"{what} pickle at byte {pos}: {message}")

    def fence() -> int:
        return marks[-1] if marks else 0

    def pop(pos) -> str:
        if len(stack) <= fence():
            raise refuse("pops an empty stack", pos)
        return stack.pop()

    def top(pos) -> str:
        if len(stack) <= fence():
            raise refuse("works on an empty stack", pos)
        return stack[-1]

    def pop_mark(pos) -> list[str]:
        if not marks:
            raise refuse("pops to a mark that was never set", pos)
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    def check_keys(kinds, pos) -> None:
        for kind in kinds:
            if kind not in _KEY_KINDS:
                raise refuse(f"a dict key or set element is a {kind}; only str, bytes, bool, "
                             f"None and ints below 2**61 are admitted", pos)

    count = 0
    try:
        for opcode, arg, pos in pickletools.genops(stream):
            count += 1
            if count > MAX_PICKLE_OPS:
                raise refuse(f"more than {MAX_PICKLE_OPS} opcodes", pos)
            name = opcode.name
            if name in _LITERAL_OPS:
                stack.append(_LITERAL_OPS[name])
            elif name in ("LONG1", "LONG4"):
                if arg.bit_length() > MAX_INT_BITS:
                    raise refuse(f"an int of {arg.bit_length()} bits (limit {MAX_INT_BITS})", pos)
                stack.append("int" if abs(arg) <= MAX_SMALL_INT else "bigint")
            elif name == "PROTO":
                if not 2 <= arg <= pickle.HIGHEST_PROTOCOL:
                    raise refuse(f"unsupported pickle protocol {arg}", pos)
            elif name == "FRAME":
                if arg > size_limit - stream.tell():
                    raise refuse(f"a frame of {arg} bytes runs past the end of the data", pos)
            elif name == "STOP":
                if marks or len(stack) != 1:
                    raise refuse("ends with a malformed stack", pos)
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "POP":
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    pop(pos)
            elif name == "POP_MARK":
                pop_mark(pos)
            elif name == "DUP":
                stack.append(top(pos))
            elif name in ("LIST", "TUPLE"):
                pop_mark(pos)
                stack.append(name.lower())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                for _ in range(int(name[-1])):
                    pop(pos)
                stack.append("tuple")
            elif name == "DICT":
                items = pop_mark(pos)
                if len(items) % 2:
                    raise refuse("DICT with an odd number of items", pos)
                check_keys(items[0::2], pos)
                stack.append("dict")
            elif name == "FROZENSET":
                check_keys(pop_mark(pos), pos)
                stack.append("frozenset")
            elif name in ("APPEND", "APPENDS"):
                pop(pos) if name == "APPEND" else pop_mark(pos)
                if top(pos) != "list":
                    raise refuse(f"{name} to a {top(pos)}", pos)
            elif name in ("SETITEM", "SETITEMS"):
                if name == "SETITEM":
                    pop(pos)
                    check_keys([pop(pos)], pos)
                else:
                    items = pop_mark(pos)
                    if len(items) % 2:
                        raise refuse("SETITEMS with an odd number of items", pos)
                    check_keys(items[0::2], pos)
                if top(pos) not in ("dict", "object"):
                    raise refuse(f"{name} on a {top(pos)}", pos)
            elif name == "ADDITEMS":
                check_keys(pop_mark(pos), pos)
                if top(pos) != "set":
                    raise refuse(f"ADDITEMS to a {top(pos)}", pos)
            elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = len(memo) if name == "MEMOIZE" else arg
                if index > len(memo):  # the pickler numbers memo entries densely from 0
                    raise refuse(f"memo index {index} skips past {len(memo)}", pos)
                memo[index] = top(pos)
            elif name in ("BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise refuse(f"memo index {arg} was never set", pos)
                stack.append(memo[arg])
            elif name in _OBJECT_OPS and allow_objects:
                if name == "GLOBAL":
                    if arg not in _ALLOWED_GLOBAL_NAMES:
                        raise Refused(
                            f"refusing to unpickle global {clip(arg.replace(' ', '.'), 120)} "
                            f"in the {what} pickle: a checkpoint should hold only tensors and "
                            "containers")
                    stack.append("global")
                elif name == "STACK_GLOBAL":
                    if (pop(pos), pop(pos)) != ("str", "str"):
                        raise refuse("STACK_GLOBAL of a non-string", pos)
                    stack.append("global")
                elif name == "REDUCE":
                    args, function = pop(pos), pop(pos)
                    if (function, args) != ("global", "tuple"):
                        raise refuse(f"REDUCE calls a {function} with a {args}", pos)
                    stack.append("object")
                elif name == "BUILD":
                    state = pop(pos)
                    if (top(pos), state) != ("object", "dict"):
                        raise refuse(f"BUILD sets a {top(pos)} from a {state}", pos)
                elif name == "BINPERSID":
                    if pop(pos) != "tuple":
                        raise refuse("a persistent id that is not a tuple", pos)
                    stack.append("object")
            elif name in _OBJECT_OPS:
                raise Refused(
                    f"refusing to unpickle the {what} pickle: it uses {name} at byte {pos}, but "
                    "it may hold only plain literals (no global, call or object)")
            else:
                raise Refused(
                    f"refusing to unpickle the {what} pickle: opcode {name} at byte {pos} is not "
                    "admitted in a checkpoint")
    except Refused:
        raise
    except Exception as err:  # noqa: BLE001 - genops: truncated data, unknown opcode, bad text
        raise Refused(f"corrupt or truncated {what} pickle: {error_text(err)}") from err
