"""``[server] processes = "auto"`` (the default): the container's CPU quota (cgroup v2 ``cpu.max``
along the process's cgroup path) and the affinity mask, at least 1; ``processes = N`` still works."""

from __future__ import annotations

from pathlib import Path

import pytest

from keybroker import settings as settings_mod
from keybroker.errors import ConfigurationError
from keybroker.server.cpus import available_cpus, cgroup_quota


def _cgroup(tmp_path: Path, own: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A fake cgroup v2 tree: ``limits`` maps a cgroup path to its ``cpu.max`` content."""
    root = tmp_path / "cgroup"
    (root / own.lstrip("/")).mkdir(parents=True)
    for path, content in limits.items():
        directory = root / path.lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.max").write_text(content + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_quota_of_own_cgroup_rounds_up(tmp_path: Path) -> None:
    """A Kubernetes limit of 2500m (cpu.max "250000 100000") gives 3 workers on 8 CPUs."""
    root, proc = _cgroup(tmp_path, "/kubepods/pod1/c1", {"/kubepods/pod1/c1": "250000 100000"})
    assert cgroup_quota(root, proc) == 2.5
    assert available_cpus(root, proc, affinity=8) == 3


def test_smallest_quota_along_the_hierarchy_counts(tmp_path: Path) -> None:
    """A pod-level limit below the container's own counts (the parent throttles both)."""
    root, proc = _cgroup(
        tmp_path,
        "/kubepods/pod1/c1",
        {"/kubepods/pod1/c1": "max 100000", "/kubepods/pod1": "200000 100000"},
    )
    assert available_cpus(root, proc, affinity=16) == 2


def test_affinity_below_quota_counts(tmp_path: Path) -> None:
    root, proc = _cgroup(
        tmp_path, "/system.slice/kb.service", {"/system.slice/kb.service": "400000 100000"}
    )
    assert available_cpus(root, proc, affinity=2) == 2


def test_no_quota_means_the_affinity_mask(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "/", {"/": "max 100000"})
    assert cgroup_quota(root, proc) is None
    assert available_cpus(root, proc, affinity=6) == 6


def test_tiny_quota_still_gives_one_worker(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "/c", {"/c": "10000 100000"})
    assert available_cpus(root, proc, affinity=4) == 1


def test_cgroup_v1_or_missing_files_fall_back_to_affinity(tmp_path: Path) -> None:
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("4:cpu,cpuacct:/docker/abc\n")
    assert available_cpus(tmp_path, proc, affinity=3) == 3
    assert available_cpus(tmp_path, tmp_path / "absent", affinity=3) == 3
    root, proc2 = _cgroup(tmp_path / "bad", "/c", {"/c": "garbage"})
    assert available_cpus(root, proc2, affinity=5) == 5


def test_auto_is_the_default_and_numbers_still_work(tmp_path: Path) -> None:
    config = tmp_path / "kb.toml"
    config.write_text("[server]\nlisten = '127.0.0.1:0'\n")
    assert settings_mod.load(config, environ={}).server.processes == 0
    config.write_text("[server]\nprocesses = 'auto'\n")
    assert settings_mod.load(config, environ={}).server.processes == 0
    config.write_text("[server]\nprocesses = 3\n")
    assert settings_mod.load(config, environ={}).server.processes == 3
    env = {"KEYBROKER_SERVER_PROCESSES": "AUTO"}
    config.write_text("[server]\nprocesses = 2\n")
    assert settings_mod.load(config, environ=env).server.processes == 0
    env = {"KEYBROKER_SERVER_PROCESSES": "4"}
    assert settings_mod.load(config, environ=env).server.processes == 4


@pytest.mark.parametrize("value", ["'many'", "-1"])
def test_bad_processes_name_the_accepted_values(tmp_path: Path, value: str) -> None:
    config = tmp_path / "kb.toml"
    config.write_text(f"[server]\nprocesses = {value}\n")
    with pytest.raises(ConfigurationError, match="auto"):
        settings_mod.load(config, environ={})


def test_serve_sizes_workers_by_available_cpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve() with processes = auto asks available_cpus(); with a fixed N it does not."""
    from keybroker.server import app

    asked: list[int] = []
    served: list[int] = []

    def cpus() -> int:
        asked.append(1)
        return 1

    monkeypatch.setattr(app, "available_cpus", cpus)
    monkeypatch.setattr(app, "_serve_one", lambda settings, worker=0: served.append(worker))
    monkeypatch.setattr(app, "disable_core_dumps", lambda: None)
    monkeypatch.setattr(app, "check_before_start", lambda settings: None)
    monkeypatch.setattr(app, "_hold_journal", lambda settings, processes: None)
    config = tmp_path / "kb.toml"
    config.write_text("[server]\nprocesses = 'auto'\n")
    app.serve(settings_mod.load(config, environ={}))
    assert (asked, served) == ([1], [0])
    config.write_text("[server]\nprocesses = 1\n")
    app.serve(settings_mod.load(config, environ={}))
    assert (asked, served) == ([1], [0, 0])
