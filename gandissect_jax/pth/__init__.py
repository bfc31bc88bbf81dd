"""Read (and write) PyTorch ``.pth`` checkpoints without PyTorch, safely whatever the file holds.

A ``.pth`` file is a pickle of tensors whose bytes live in separate "storages". Two container
formats exist (source: PyTorch's ``torch/serialization.py``, ``_legacy_save``/``_legacy_load`` and
``_save``/``_load``, and ``torch/_utils.py`` for the rebuild functions):

- **legacy** (PyTorch <= 1.5, and every checkpoint released with GAN Dissection): five pickles in
  one file -- magic number, protocol version, system info, the object (tensors pickled as calls to
  ``torch._utils._rebuild_tensor_v2`` whose storage is a persistent id
  ``('storage', torch.<T>Storage, key, location, numel, view_metadata)``), the list of storage keys
  -- followed, for each key in that list, by an int64 element count and the raw little-endian
  bytes of the storage;
- **zip** (PyTorch >= 1.6, recognised as torch does by a leading ``PK\\x03\\x04``): a zip archive
  holding ``<root>/data.pkl`` (the object pickle, persistent ids
  ``('storage', torch.<T>Storage, key, location, numel)``) and one raw member ``<root>/data/<key>``
  per storage.

Files come from strangers, so reading one never executes anything from it, never reads outside
a buffer and never allocates more than the limits below; any file that breaks a rule raises
:class:`PthError` whose message starts with the file's path. What is guaranteed:

- **Every pickle is checked before it runs.** Each pickle (the legacy file's magic number,
  protocol, system info, object and key list; the zip's ``data.pkl``) is first walked opcode by
  opcode (``pickletools.genops``) with a model of the unpickler's stack, and refused unless it
  uses only protocol-2+ binary opcodes for literals (None, bool, int, float, str, bytes), the
  containers list / tuple / dict / set / frozenset, marks and the memo. The four header pickles
  admit nothing else: no global at all. The object pickle may also use ``GLOBAL`` /
  ``STACK_GLOBAL`` for exactly ``collections.OrderedDict`` (called with no arguments),
  ``torch._utils._rebuild_tensor``, ``torch._utils._rebuild_tensor_v2``,
  ``torch._utils._rebuild_parameter`` and the ``torch.<T>Storage`` types listed in
  ``STORAGE_DTYPES`` (plus ``BFloat16Storage``); ``REDUCE`` on those; ``BUILD`` with a dict
  state on what they return (torch sets ``state_dict()._metadata`` so; the reader's own tensor,
  storage and global stand-ins refuse it); and ``BINPERSID`` for storages. Never admitted: any
  other global, ``INST`` / ``OBJ`` / ``NEWOBJ`` / ``NEWOBJ_EX``, extension codes, text-argument
  opcodes other than ``GLOBAL``, out-of-band buffers. The checked bytes are then unpickled by a
  restricted :class:`pickle.Unpickler` that enforces the same list (``find_class``), so a check
  that missed something still runs nothing.
- **Pickle resources are bounded before they are used:** at most ``MAX_PICKLE_BYTES`` (32 MiB)
  and ``MAX_PICKLE_OPS`` (2**21) opcodes per pickle; every length prefix fits in the bytes that
  are left; memo indices are dense (so the memo never grows past the opcode count); ints have at
  most ``MAX_INT_BITS`` (1024) bits; dict keys and set elements are str, bytes, bool, None or
  ints below 2**61 in magnitude (no tuple keys: hashing a deep tuple crashes CPython; no crafted
  hash collisions); the object returned nests at most ``MAX_DEPTH`` (100) containers deep.
- **Persistent ids and rebuild calls are type-checked:** the id has the format's exact shape, a
  known storage type, a key of ``[0-9A-Za-z_]{1,64}``, a non-negative element count, and a legacy
  view inside its storage; a key used twice names the same type and count. ``_rebuild_tensor*``
  takes a storage from a persistent id, a non-negative int offset, and size and stride sequences
  of equal length (at most ``MAX_NDIM``, 32) of non-negative ints; every offset, size, stride and
  element count is at most ``MAX_ELEMENTS`` (2**40).
- **Tensor metadata is validated before any view is made:** offset + sum((size - 1) * stride)
  lies inside the storage (or view) the tensor names; the product of the sizes is at most
  ``MAX_ELEMENTS`` (2**40). The view is made with ``as_strided`` only after this check (and it is
  re-checked against the bytes actually read), and copied into an independent array.
- **Storage sizes match the file before they are read:** legacy: the key list names exactly the
  storages the object references, each once; each int64 element count equals the count in the
  pickle and its bytes fit in what is left of the file, checked before reading. Zip: member names
  are unique and plain (no ``..``, absolute or backslash paths), there is exactly one
  ``data.pkl``, and a member is only read after its declared uncompressed size has been checked
  (``data.pkl`` at most 32 MiB; each storage exactly element count x item size) and its
  compression is stored or deflated (methods with unbounded decompression are refused).
- **Total allocation is bounded by the file:** storage bytes read plus arrays returned stay
  within ``_ALLOCATION_FACTOR`` (8) x the file size + ``_ALLOCATION_SLACK`` (64 MiB), which covers
  shared views and expanded (stride-0) tensors of real checkpoints, but not a zip bomb or a forged
  10**12-element tensor. No read asks the OS for more bytes than the file has left.

Tensors come back as ``numpy.ndarray`` in their stored layout (PyTorch's, e.g. OIHW conv weights;
bfloat16 widened to float32; bool bytes other than 0/1 read as True).

:func:`write_legacy_pth` writes a mapping of arrays in the legacy format, so tests can build files
exactly like the released checkpoints without PyTorch.
"""

from ._common import PthError
from ._read import read_pth, read_state_dict
from ._write import write_legacy_pth

__all__ = ["PthError", "read_pth", "read_state_dict", "write_legacy_pth"]
