"""The kernels' shared constants, as csrc/kernels/params.h states them.

The C++ header is the truth; the extension exports its values (``constants()``) and
``jax_flashmla._ffi`` checks them against this module when it loads the extension, so the two
cannot drift unnoticed. The pure-JAX schedule twin (ops/metadata.py) and the kernels' coverage
rules read them from here, so they also hold on machines without the extension.
"""
META_INTS = 8              # ints per row of tile_scheduler_metadata
TILE_TOKENS = 64           # KV tokens per main-loop tile (every decode kernel)
PAGE_BLOCK = 64            # page size the dense kernel reads (one page = one tile)
FIXED_OVERHEAD = 5         # scheduler cost of one (sequence, chunk), in tiles
BLOCK_M = 64               # query rows per CTA tile
D_V = 512                  # value width of every kernel
DENSE_D_QK = 576
MAX_SCHEDULER_BATCH = 40000   # sequences the scheduler kernel takes (one int each in smem)
MAX_GRID_Y = 65535         # CUDA's grid.y / grid.z limit

ALL = dict(META_INTS=META_INTS, TILE_TOKENS=TILE_TOKENS, PAGE_BLOCK=PAGE_BLOCK,
           FIXED_OVERHEAD=FIXED_OVERHEAD, BLOCK_M=BLOCK_M, D_V=D_V, DENSE_D_QK=DENSE_D_QK,
           MAX_SCHEDULER_BATCH=MAX_SCHEDULER_BATCH, MAX_GRID_Y=MAX_GRID_Y)
