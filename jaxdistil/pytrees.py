"""Names of places in a pytree: ``encoder/layers/q_lin/kernel``, ``1/mu/embeddings/...``."""

from __future__ import annotations

from typing import Any


def path_str(path: tuple[Any, ...]) -> str:
    """A tree path (``jax.tree_util`` keys) as ``a/b/0/c``.

    Dict keys, sequence indices and attribute names all become parts, so the same place reads
    the same in memory and on disk (orbax's metadata turns optax's named-tuple states into dicts:
    ``[1].count`` in memory is ``[1]['count']`` on disk, both ``1/count`` here). The ``value``
    attribute of ``flax.linen`` boxes (``nn.Partitioned``) is left out: a boxed and an unboxed
    parameter have the same name.
    """
    parts = []
    for key in path:
        if hasattr(key, "key"):  # DictKey, FlattenedIndexKey
            parts.append(str(key.key))
        elif hasattr(key, "idx"):  # SequenceKey
            parts.append(str(key.idx))
        elif hasattr(key, "name"):  # GetAttrKey
            if key.name != "value":
                parts.append(str(key.name))
        else:
            parts.append(str(key))
    return "/".join(parts)
