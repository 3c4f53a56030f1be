"""The gRPC services the queen serves: Queen, QueenAdmin, QueenRegistry."""
