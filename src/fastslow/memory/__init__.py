"""Experience memory: the zero-drift fast channel (lessons and cases retrieved per problem).

- :mod:`fastslow.memory.store`: lessons and cases, delta operations, caps, the ``RUN/memory`` file;
- :mod:`fastslow.memory.curator`: a round's scored attempts -> deltas, through the reflector seam;
- :mod:`fastslow.memory.retrieve`: retrieval per problem: BM25 (bm25s), dense (the policy's hidden states), hybrid;
- :mod:`fastslow.memory.channel`: :class:`MemoryChannel` (``fast.kind: memory``) and
  :class:`GepaMemoryChannel` (``fast.kind: gepa+memory``) behind the fast-channel seam.
"""

from fastslow.memory.channel import GepaMemoryChannel, MemoryChannel
from fastslow.memory.store import MemoryFileError, Store, read_dir

__all__ = ["GepaMemoryChannel", "MemoryChannel", "MemoryFileError", "Store", "read_dir"]
