"""Numerical ops: one file per op family, each op with its plain-torch reference beside it (``*_ref``).

The map (registered ops are ``torch.ops.loraga_fast.<name>``, ``_`` = in place on ``acc``; backends are the op's
entries in the one dispatch table, :data:`loraga_fast.ops._dispatch.IMPLS`)::

    public function        file           registered op          backends       reference
    accumulate             accumulate.py  accumulate_            torch, triton  accumulate_ref
    sketch_accumulate      sketch.py      sketch_accumulate_     torch, triton  sketch_accumulate_ref
    probe_accumulate       sketch.py      probe_accumulate_      torch          (its torch implementation)
    factors_from_sketch    sketch.py      factors_from_sketch    torch          factors_from_sketch_ref
    compress_update        stream.py      compress_update        torch          compress_update_ref
    merge_update           stream.py      merge_update           torch          merge_update_ref
    batched_rsvd           rsvd.py        batched_rsvd           torch          rsvd_ref
    orthonormalize         rsvd.py        orthonormalize         torch          (torch.linalg.qr(y).Q)
    sharded_rsvd           rsvd.py        -- (plain function)    --             batched_rsvd of the gathered rows
    orthonormalize_sharded rsvd.py        -- (plain function)    --             orthonormalize of the gathered rows
    gather_rows            rsvd.py        -- (plain function)    --             --

The Triton kernel of ``accumulate`` (used twice by ``sketch_accumulate``), its launcher and its config table live
in ``_accumulate_triton.py``; the policy and the table in ``_dispatch.py``; the IEEE-fp32 scope in ``_precision.py``.
``accumulate_triton`` (that launcher, with the ``split_t`` and ``config`` overrides benchmarks use) is exported too.

Every registered op is built the same way: the public function checks its arguments, then calls the registered
op when ``torch.compile`` is tracing (one opaque op in the graph) and the op's implementation directly in eager
mode (no dispatcher overhead); the implementation is ``_dispatch.dispatch(op, ...)``: the one policy,
:func:`~loraga_fast.ops._dispatch.select_backend`, then the one table. Each op has a fake implementation (the
in-place ops return nothing; the functional ones run the layout-deciding torch ops on fake tensors, so shapes
and strides match the real outputs on every device) and is checked with ``torch.library.opcheck`` in
``tests/ops``. ``batched_rsvd`` draws its Gaussian test matrix from the caller's generator in the public
function and hands it to the op as a tensor.

Not registered: ``sharded_rsvd``, ``orthonormalize_sharded`` and ``gather_rows`` take a ``torch.distributed``
process group object and (``sharded_rsvd``) a ``torch.Generator``, which ``torch.library.custom_op`` cannot take
(a schema can name a group, never hold a group object or a generator), and they issue collectives, which stay
visible to the caller (and to ``torch.compile``) rather than hide inside an opaque op. They are plain functions
built from the registered ops above.

Importing this package neither touches CUDA nor fails without triton (``_accumulate_triton`` imports triton
when it is installed and defines the kernel only then; it is jitted on first use).
"""

from .accumulate import accumulate, accumulate_ref, accumulate_triton
from .rsvd import batched_rsvd, gather_rows, orthonormalize, orthonormalize_sharded, rsvd_ref, sharded_rsvd
from .stream import compress_update, compress_update_ref, merge_update, merge_update_ref
from .sketch import (
    factors_from_sketch,
    factors_from_sketch_ref,
    probe_accumulate,
    sketch_accumulate,
    sketch_accumulate_ref,
)

__all__ = [
    "accumulate",
    "accumulate_ref",
    "accumulate_triton",
    "batched_rsvd",
    "compress_update",
    "compress_update_ref",
    "factors_from_sketch",
    "factors_from_sketch_ref",
    "gather_rows",
    "merge_update",
    "merge_update_ref",
    "orthonormalize",
    "orthonormalize_sharded",
    "probe_accumulate",
    "rsvd_ref",
    "sharded_rsvd",
    "sketch_accumulate",
    "sketch_accumulate_ref",
]
