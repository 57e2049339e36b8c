"""Numerics: what each format kind means (``kinds``), the format registry (``formats``),
quantize-dequantize math (``quant``), the trainable quantizer modules (``quantizers``) and the
one description of a fixed quantizer every backend reads (``qspec.QuantSpec``). Imports only
``base``."""
