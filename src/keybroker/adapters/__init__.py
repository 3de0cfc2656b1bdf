"""Adapters: the outside world (HSM, tokens, telemetry) behind the core's ports."""
