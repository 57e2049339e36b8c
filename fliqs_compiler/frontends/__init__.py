"""Graph frontends.

- ``onnx_import``: ONNX file → trainable ``fx`` Graph (validation, shape pinning, conversion);
  ``onnx_ops`` holds the op registry, filled by ``ops_nn`` / ``ops_shape`` / ``ops_qdq``;
  ``builder`` folds constants and emits fx nodes; ``batch`` makes the imported graph run on any
  batch size (two conversions compared, literal batch-1 targets unpinned, checked per sample).
- ``torch_import``: ``nn.Module`` → Graph via ``torch.export``.
- ``verify``: the onnxruntime cross-check behind ``fliqs inspect --verify``.

Import the submodules directly; this package imports nothing heavy on its own.
"""
