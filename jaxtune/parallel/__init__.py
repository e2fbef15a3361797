"""The device mesh, sharding rules, ring attention and multi-host start-up.

Importing the package registers ring attention with jaxtune.kernels.attention (the kernels do not
import the mesh layer)."""

from jaxtune.parallel import ring as _ring  # noqa: F401
