"""Paper 3: approximate maximum inner product search by spherical k-means after a MIPS → cosine reduction."""

from triptych.mips.index import ClusterIndex, SearchStats
from triptych.mips.kmeans import SphericalKMeans
from triptych.mips.reductions import (
    l2_alsh_items,
    l2_alsh_queries,
    sign_alsh_items,
    sign_alsh_queries,
    simple_lsh_items,
    simple_lsh_queries,
)
from triptych.mips.sharded import ShardedClusterIndex  # imports without Ray; Ray is needed to construct one

__all__ = [
    "ClusterIndex",
    "SearchStats",
    "ShardedClusterIndex",
    "SphericalKMeans",
    "l2_alsh_items",
    "l2_alsh_queries",
    "sign_alsh_items",
    "sign_alsh_queries",
    "simple_lsh_items",
    "simple_lsh_queries",
]
