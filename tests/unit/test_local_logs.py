"""`bubuh up` appends each process's output to .local/logs/<name>.log; a log grown past its size is set aside."""

from __future__ import annotations

from services.kernel.settings import Settings
from services.operator import local_processes


def test_a_large_log_is_set_aside_at_start_and_a_small_one_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(local_processes, "LOG_ROTATE_BYTES", 1000)
    settings = Settings(local_dir=tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    assert local_processes.log_file(settings, "api-1") == logs / "api-1.log"       # none yet: nothing to do
    (logs / "api-1.log").write_bytes(b"old\n" * 300)                                # 1,200 bytes: past the size
    (logs / "api-1.log.1").write_bytes(b"older\n")
    (logs / "quota-1.log").write_bytes(b"small\n")
    assert local_processes.log_file(settings, "api-1") == logs / "api-1.log"
    assert not (logs / "api-1.log").exists() and (logs / "api-1.log.1").read_bytes() == b"old\n" * 300
    local_processes.log_file(settings, "quota-1")
    assert (logs / "quota-1.log").read_bytes() == b"small\n" and not (logs / "quota-1.log.1").exists()
