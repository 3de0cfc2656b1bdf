"""The keybroker client SDK for storage services.

::

    from keybroker.client import KeyBrokerClient, TokenFile

    kb = KeyBrokerClient.from_files("keybroker:50051", ca_file="ca.pem", cert_file="svc.pem",
                                    key_file="svc.key", token=TokenFile("/run/token"))
    with open("call.wav", "rb") as src, open("call.wav.kbr", "wb") as dst:
        kb.encrypt_recording(src, dst, recording_id="rec-1", purposes=["support"])
    with open("call.wav.kbr", "rb") as src, open("call.wav", "wb") as dst:
        kb.decrypt_recording(src, dst, purpose="support")

Errors are the domain classes of :mod:`keybroker.errors`.
"""

from keybroker.client._calls import DataKey, TlsFiles, WrappedDataKey
from keybroker.client.aio import AsyncKeyBrokerClient
from keybroker.client.recording import RecordingHeader, decrypt_stream, encrypt_stream, new_header
from keybroker.client.retry import NO_RETRY, RetryPolicy
from keybroker.client.sync import KeyBrokerClient
from keybroker.client.tokens import StaticToken, TokenFile, TokenProvider

__all__ = [
    "NO_RETRY",
    "AsyncKeyBrokerClient",
    "DataKey",
    "KeyBrokerClient",
    "RecordingHeader",
    "RetryPolicy",
    "StaticToken",
    "TlsFiles",
    "TokenFile",
    "TokenProvider",
    "WrappedDataKey",
    "decrypt_stream",
    "encrypt_stream",
    "new_header",
]
