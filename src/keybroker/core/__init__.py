"""The pure core: wrapped-key format, policy decisions, use cases and the ports they need.

Nothing here imports grpc, pkcs11, jwt, the OpenTelemetry SDK or a database driver;
a test guards it.
"""
