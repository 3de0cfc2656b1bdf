"""Initialise a PKCS#11 token (SoftHSM2's free slot) without a PIN on any command line.

    python3 softhsm/init_token.py MODULE LABEL USER_PIN_FILE < so-pin

Reads the SO PIN from the first line of stdin and the user PIN from USER_PIN_FILE, initialises the
first uninitialised token of MODULE with LABEL (C_InitToken), then sets the user PIN (C_InitPIN as
the SO). Standard library only (ctypes), so any python3 runs it; softhsm/init-token.sh calls it.
``softhsm2-util`` would need the PINs as arguments (visible to every user in ``ps``) or a terminal.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_TOKEN_INITIALIZED = 0x400
CKU_SO = 0
CK_ULONG = ctypes.c_ulong


class TokenInfo(ctypes.Structure):
    """CK_TOKEN_INFO up to ``flags`` (the rest is not read)."""

    _fields_ = [
        ("label", ctypes.c_char * 32),
        ("manufacturer", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serial", ctypes.c_char * 16),
        ("flags", CK_ULONG),
        ("rest", ctypes.c_ubyte * 160),
    ]


def check(rv: int, what: str) -> None:
    if rv != 0:
        raise SystemExit(f"init_token: {what} failed (CKR {rv:#x})")


def slots(lib: ctypes.CDLL) -> list[int]:
    count = CK_ULONG(0)
    check(lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(count)), "C_GetSlotList")
    ids = (CK_ULONG * count.value)()
    check(lib.C_GetSlotList(ctypes.c_ubyte(1), ids, ctypes.byref(count)), "C_GetSlotList")
    return list(ids[: count.value])


def token_info(lib: ctypes.CDLL, slot: int) -> TokenInfo:
    info = TokenInfo()
    check(lib.C_GetTokenInfo(CK_ULONG(slot), ctypes.byref(info)), "C_GetTokenInfo")
    return info


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    module, label, user_pin_file = argv[1], argv[2], Path(argv[3])
    so_pin = sys.stdin.readline().strip().encode()
    user_pin = user_pin_file.read_text().strip().encode()
    if len(so_pin) < 4 or len(user_pin) < 4:
        raise SystemExit(
            "init_token: the SO PIN (stdin) and the user PIN need 4 characters or more"
        )
    padded = label.encode().ljust(32, b" ")
    if len(padded) > 32:
        raise SystemExit("init_token: the label is longer than 32 bytes")
    lib = ctypes.CDLL(module)
    check(lib.C_Initialize(None), "C_Initialize")
    try:
        if any(token_info(lib, s).label == padded for s in slots(lib)):
            raise SystemExit(f"init_token: a token labelled {label!r} exists already")
        free = [s for s in slots(lib) if not token_info(lib, s).flags & CKF_TOKEN_INITIALIZED]
        if not free:
            raise SystemExit("init_token: no uninitialised token (slot) in this module")
        check(
            lib.C_InitToken(CK_ULONG(free[0]), so_pin, CK_ULONG(len(so_pin)), padded), "InitToken"
        )
    finally:
        lib.C_Finalize(None)
    # SoftHSM moves an initialised token to a new slot id: select it by label, after a restart.
    check(lib.C_Initialize(None), "C_Initialize")
    try:
        slot = next(s for s in slots(lib) if token_info(lib, s).label == padded)
        session = CK_ULONG(0)
        flags = CK_ULONG(CKF_SERIAL_SESSION | CKF_RW_SESSION)
        check(lib.C_OpenSession(CK_ULONG(slot), flags, None, None, ctypes.byref(session)), "open")
        check(lib.C_Login(session, CK_ULONG(CKU_SO), so_pin, CK_ULONG(len(so_pin))), "SO login")
        check(lib.C_InitPIN(session, user_pin, CK_ULONG(len(user_pin))), "C_InitPIN")
        lib.C_Logout(session)
        lib.C_CloseSession(session)
    finally:
        lib.C_Finalize(None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
