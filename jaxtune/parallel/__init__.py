"""The device mesh, sharding rules, ring attention and multi-host start-up.

Importing the package registers ring attention with jaxtune.kernels.attention and expert-parallel
dispatch with jaxtune.models.moe (the kernels and models do not import the mesh layer)."""

from jaxtune.parallel import experts as _experts  # noqa: F401
from jaxtune.parallel import ring as _ring  # noqa: F401
