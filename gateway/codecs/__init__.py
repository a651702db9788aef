"""codecs: V2 wire formats (REST JSON + binary extension, gRPC protobuf) <-> internal types."""
