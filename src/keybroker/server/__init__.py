"""gRPC server: servicers translate proto <-> core; one module maps errors to status codes."""
