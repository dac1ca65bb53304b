"""ONNX / int8 / TensorRT exporters and parity reports (installed as rematch_fast.export). None has landed yet."""
