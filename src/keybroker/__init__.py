"""keybroker: per-recording data keys wrapped under HSM-held keys, over mTLS, gated by JWT."""

__version__ = "0.1.0"
