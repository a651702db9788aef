"""An async model-serving gateway for ONNX models speaking KServe V2 over HTTP and gRPC."""

__version__ = "0.1.0"
