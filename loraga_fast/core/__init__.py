"""The flow every mode shares, from a checked plan to initialized peft layers.

* :mod:`~loraga_fast.core.plan` -- :func:`~loraga_fast.core.plan.make_plan`: every data-free check, once; the
  targets, ranks, mode, memory and store of a run;
* :mod:`~loraga_fast.core.memory` -- the accumulator memory of each mode and the fit check;
* :mod:`~loraga_fast.core.passes` -- the capture passes over ``train_step``, reductions and the checks between;
* :mod:`~loraga_fast.core.convergence` -- ``until="converged"``: the subspace checks that stop ``train_step``;
* :mod:`~loraga_fast.core.allocation` -- ``rank_budget=``: per-layer ranks from the gradient spectra;
* :mod:`~loraga_fast.core.handoff` -- attaching the result and initializing the layers inside
  ``peft.get_peft_model``;
* :mod:`~loraga_fast.core.layer_init` -- peft's per-layer LoRA-GA math on precomputed factors.
"""
