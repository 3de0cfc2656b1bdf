"""Fuzz the settings loader (keybroker.settings): TOML text plus KEYBROKER_* environment overrides.

The input's first byte says how many environment variables follow (0..7). Each takes a name,
either one of the real ``KEYBROKER_<SECTION>_<KEY>`` names or fuzzed text after the prefix, and a
fuzzed value; the remaining bytes are the TOML file, written as they are (not necessarily UTF-8).
``settings.load`` must return Settings or raise ConfigurationError, which names the key and the
fix; any other exception would reach the operator as a traceback instead of a message. Settings
it returns must hold finite numbers, pass ``validate`` again and give their retention-epoch
scheme. ``tests/fuzz/settings.dict`` gives the fuzzer section names, keys and awkward values.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from functools import cache
from pathlib import Path

from keybroker import settings
from keybroker.errors import ConfigurationError
from tests.fuzz._common import ALL_REMAINING, FuzzFailure, provider


@cache
def env_names() -> tuple[str, ...]:
    return tuple(
        f"{settings.ENV_PREFIX}{section.upper()}_{f.name.upper()}"
        for section, cls in settings._SECTIONS.items()
        for f in dataclasses.fields(cls)
    )


@cache
def config_file() -> Path:
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="kb-fuzz-settings-", dir=base)) / "keybroker.toml"


def check(toml: bytes, environ: dict[str, str]) -> settings.Settings | None:
    path = config_file()
    path.write_bytes(toml)
    try:
        loaded = settings.load(path, environ=environ)
    except ConfigurationError as exc:
        if not exc.message:
            raise FuzzFailure("a configuration error without a message") from exc
        return None
    for section in dataclasses.fields(loaded):
        value = getattr(loaded, section.name)
        for f in dataclasses.fields(value) if dataclasses.is_dataclass(value) else ():
            number = getattr(value, f.name)
            if isinstance(number, float) and not math.isfinite(number):
                raise FuzzFailure(f"[{section.name}] {f.name} loaded as {number}")
    try:
        settings.validate(loaded)
        loaded.keys.epoch_scheme()
    except ConfigurationError as exc:
        raise FuzzFailure(f"loaded settings that do not validate: {exc.message}") from exc
    return loaded


def test_one_input(data: bytes) -> None:
    if not data:
        return
    fdp = provider(data[1:])
    environ: dict[str, str] = {}
    for _ in range(data[0] % 8):
        if fdp.ConsumeIntInRange(0, 3):
            name = fdp.PickValueInList(list(env_names()))
        else:
            name = settings.ENV_PREFIX + str(fdp.ConsumeUnicodeNoSurrogates(24))
        environ[name] = str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 64)))
    check(fdp.ConsumeBytes(ALL_REMAINING), environ)
