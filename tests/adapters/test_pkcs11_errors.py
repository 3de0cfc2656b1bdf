"""The one PKCS#11 error table (keybroker.adapters.pkcs11_errors) and its use by the HSM adapter."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from pkcs11 import exceptions as p11

from keybroker.adapters import hsm, hsm_sessions, pkcs11_errors
from keybroker.adapters.pkcs11_errors import FAULTS, Fault, domain_error, fault_of
from keybroker.errors import (
    ConfigurationError,
    HsmUnavailableError,
    InvalidWrappedKeyError,
    NotFoundError,
)

ALL_CLASSES = sorted(
    (
        cls
        for _, cls in inspect.getmembers(p11, inspect.isclass)
        if issubclass(cls, p11.PKCS11Error)
    ),
    key=lambda cls: cls.__name__,
)


def test_every_pkcs11_exception_class_has_exactly_one_row() -> None:
    """A class python-pkcs11 adds in an upgrade must be placed on purpose, not by the catch-all."""
    missing = [cls.__name__ for cls in ALL_CLASSES if cls not in FAULTS]
    assert missing == []
    rows = [cls for classes in pkcs11_errors._ROWS.values() for cls in classes]
    assert len(rows) == len(set(rows)), "a class sits in two rows"


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda cls: cls.__name__)
def test_every_class_maps_to_a_domain_error_and_never_blames_the_blob(
    cls: type[p11.PKCS11Error],
) -> None:
    """Without a healthy-token probe nothing is "wrapped key is invalid", and nothing is an
    internal error: the HSM's failures are UNAVAILABLE (or a missing key)."""
    exc = cls()
    err = domain_error(exc)
    assert isinstance(err, HsmUnavailableError | NotFoundError)
    assert not isinstance(err, InvalidWrappedKeyError)


def test_only_tag_like_faults_blame_the_blob_after_a_healthy_probe() -> None:
    blamed = {
        cls.__name__
        for cls in ALL_CLASSES
        if isinstance(domain_error(cls(), tag_failure=True), InvalidWrappedKeyError)
    }
    assert blamed == {"GeneralError", "EncryptedDataInvalid", "EncryptedDataLenRange"}


def test_the_catch_all_and_the_aead_quirk() -> None:
    """An unknown return value is MODULE (unavailable); PKCS#11 3.0's CKR_AEAD_DECRYPT_FAILED,
    which python-pkcs11 0.10 has no class for, is a failed tag check."""

    class Newer(p11.PKCS11Error):
        pass

    class NewerLost(p11.TokenNotPresent):
        pass

    assert fault_of(p11.PKCS11Error("Unmapped error code 0x1b")) is Fault.MODULE
    assert fault_of(Newer()) is Fault.MODULE
    assert fault_of(NewerLost()) is Fault.LOST
    assert fault_of(p11.PKCS11Error("Unmapped error code 0x35")) is Fault.BAD_DATA


def test_configuration_errors_only_while_starting() -> None:
    """An unknown token or a refused PIN stops the start; later it is an outage that may end."""
    assert isinstance(domain_error(p11.NoSuchToken(), starting_label="t"), ConfigurationError)
    wrong = domain_error(p11.PinIncorrect(), starting_label="t")
    assert isinstance(wrong, ConfigurationError)
    assert "PIN is incorrect" in wrong.message
    assert isinstance(domain_error(p11.PinLocked(), starting_label="t"), ConfigurationError)
    for exc in (p11.NoSuchToken(), p11.PinIncorrect(), p11.PinLocked()):
        assert isinstance(domain_error(exc), HsmUnavailableError)


def _excepts(module: object) -> set[str]:
    tree = ast.parse(Path(inspect.getfile(module)).read_text())  # type: ignore[arg-type]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            names |= {ast.unparse(t) for t in types}
    return names


def test_the_hsm_adapter_catches_pkcs11_errors_only_as_a_whole() -> None:
    """Every call site hands PKCS11Error to the table: no call site catches one class of it and
    translates it its own way (there were several, each a little different)."""
    pkcs11_names = {cls.__name__ for cls in ALL_CLASSES} - {"PKCS11Error"}
    for module in (hsm, hsm_sessions):
        assert _excepts(module) & pkcs11_names == set(), module.__name__
