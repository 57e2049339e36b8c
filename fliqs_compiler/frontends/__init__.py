"""Graph frontends.

- ``onnx_import``: ONNX file → trainable ``fx`` Graph (validation, shape pinning, conversion);
  ``onnx_ops`` holds the op registry, filled by ``ops_nn`` / ``ops_shape`` / ``ops_qdq``;
  ``builder`` folds constants and emits fx nodes.
- ``torch_import``: ``nn.Module`` → Graph via ``torch.export``.
- ``verify``: the onnxruntime cross-check behind ``fliqs inspect --verify``.

Import the submodules directly; this package imports nothing heavy on its own.
"""
