"""The domain exception tree and its one mapping to gRPC status codes."""

from __future__ import annotations

import importlib
import pkgutil

import grpc
import pytest

import keybroker
from keybroker import errors
from keybroker.server.status import STATUS_TABLE, status_for


def _import_every_module() -> None:
    """Import all of keybroker, so subclasses defined anywhere are registered."""
    for info in pkgutil.walk_packages(keybroker.__path__, "keybroker."):
        importlib.import_module(info.name)


def _all_subclasses(cls: type[errors.KeybrokerError]) -> set[type[errors.KeybrokerError]]:
    found: set[type[errors.KeybrokerError]] = set()
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= _all_subclasses(sub)
    return found


_import_every_module()
ERROR_CLASSES = sorted(
    _all_subclasses(errors.KeybrokerError) | {errors.KeybrokerError},
    key=lambda c: f"{c.__module__}.{c.__qualname__}",
)
TABLE = dict(STATUS_TABLE)
GENERIC = errors.InternalError.default_message


def test_the_tree_has_the_expected_classes() -> None:
    """The walk finds at least the classes of keybroker.errors (it is not vacuous)."""
    assert {errors.InvalidWrappedKeyError, errors.RetentionExpiredError, errors.HsmUnavailableError}
    assert {
        errors.InvalidWrappedKeyError,
        errors.RetentionExpiredError,
        errors.HsmUnavailableError,
        errors.ConfigurationError,
    } <= set(ERROR_CLASSES)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__qualname__)
def test_every_error_class_has_its_own_row(cls: type[errors.KeybrokerError]) -> None:
    """Each KeybrokerError subclass has an explicit row with a meaningful status code."""
    assert cls in TABLE, f"{cls.__module__}.{cls.__qualname__} has no row in STATUS_TABLE"
    assert TABLE[cls] not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__qualname__)
def test_status_for_uses_the_class_row(cls: type[errors.KeybrokerError]) -> None:
    """status_for gives the class's own code; INTERNAL always comes with the generic message."""
    exc = cls()
    code, message = status_for(exc)
    assert code is TABLE[cls]
    if code is grpc.StatusCode.INTERNAL:
        assert message == GENERIC
    else:
        assert message == exc.message


def test_table_lists_subclasses_before_their_bases() -> None:
    """First match wins, so a class must come before every class it inherits from."""
    classes = [cls for cls, _ in STATUS_TABLE]
    for i, cls in enumerate(classes):
        for later in classes[i + 1 :]:
            assert not issubclass(later, cls), f"{later.__name__} is shadowed by {cls.__name__}"
    assert classes[-1] is errors.KeybrokerError


@pytest.mark.parametrize(
    "exc",
    [
        Exception("db password=hunter2"),
        ValueError("/var/lib/keybroker/secret"),
        KeyError("kek:recordings:v1"),
        RuntimeError(),
        TypeError("Expecting a dict"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_plain_exception_is_internal_with_generic_message(exc: Exception) -> None:
    """Anything that is not a domain error is INTERNAL with a message that reveals nothing."""
    code, message = status_for(exc)
    assert code is grpc.StatusCode.INTERNAL
    assert message == GENERIC
    assert str(exc) not in message or not str(exc)


def test_internal_domain_errors_hide_their_message() -> None:
    """Configuration and internal errors reach the caller only as the generic message."""
    for exc in (
        errors.ConfigurationError("[hsm] pin_file: cannot read /secrets/pin"),
        errors.InternalError("invariant broken at handle 0x7f"),
        errors.KeybrokerError("something specific"),
    ):
        assert status_for(exc) == (grpc.StatusCode.INTERNAL, GENERIC)


def test_user_errors_keep_their_public_message() -> None:
    """Errors the caller can act on carry their public message."""
    exc = errors.PermissionDeniedError("token lacks scope keys:unwrap", reason="scope_missing")
    assert status_for(exc) == (grpc.StatusCode.PERMISSION_DENIED, "token lacks scope keys:unwrap")
    assert status_for(errors.RetentionExpiredError()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "retention expired",
    )
    assert status_for(errors.InvalidWrappedKeyError()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "wrapped key is invalid",
    )


def test_error_defaults_and_repr() -> None:
    """Every class has a non-empty default message and reason, shown by repr."""
    for cls in ERROR_CLASSES:
        exc = cls()
        assert exc.message
        assert exc.reason
        assert str(exc) == exc.message
        assert repr(exc) == f"{cls.__name__}(reason={exc.reason!r}, message={exc.message!r})"
