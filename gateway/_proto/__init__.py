"""Generated protobuf and gRPC modules; regenerate with scripts/gen-proto, never edit."""
