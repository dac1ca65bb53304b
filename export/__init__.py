"""Exporters (installed as rematch_fast.export): ONNX graphs of the text path (onnx.py) and the
exporter that writes an export folder (exporter.py). int8 presets, TensorRT and parity reports
arrive later."""
