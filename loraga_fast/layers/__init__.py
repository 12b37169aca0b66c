"""Layers: what a target layer is and how it is routed through the capture op.

* :mod:`~loraga_fast.layers.kinds` -- the target layer types (``nn.Linear``, transformers ``Conv1D``), their
  weight shape and layout;
* :mod:`~loraga_fast.layers.quantized` -- bitsandbytes 4-/8-bit bases: the consumed input, the dequantized weight,
  the offset strategies, the quantized kinds that are refused;
* :mod:`~loraga_fast.layers.targets` -- which layers peft's rules select, at which LoRA rank, the shape checks;
* :mod:`~loraga_fast.layers.capture` -- the capture op, :class:`~loraga_fast.layers.capture.CaptureSession` and the
  :class:`~loraga_fast.layers.capture.Slot` interface the stores implement.

Depends on :mod:`loraga_fast.ops` only; no linear algebra here.
"""
