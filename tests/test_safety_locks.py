"""Finding 1: two runs on one folder mixed silently (both exit 0, model.pt from the other run).

Now `scripts.runtime.lock_directory` holds an exclusive lock file with the holder's PID on
--ckpt_dir (training) and on --output_dir (inference, evaluation); a second run stops with
one line naming the PID; the lock of a dead process is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from monai.bundle import ConfigWorkflow

from scripts.runtime import LOCK_NAME, LockError, lock_directory, project_error, release_locks
from tests.safety_data import INFERENCE, META, REPO, TINY_TRAIN, TRAIN, write_dataset

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from scripts.runtime import lock_directory
    lock_directory(sys.argv[1], flag="--ckpt_dir", purpose="training")
    print("locked", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def holder(tmp_path):
    """A live process of another run holding the lock of tmp_path / 'held'."""
    folder = tmp_path / "held"
    process = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO)), str(folder)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    yield folder, process.pid
    process.kill()
    process.wait()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_run_on_a_locked_folder_stops_naming_the_holder_pid(holder):
    folder, pid = holder
    with pytest.raises(LockError) as caught:
        lock_directory(folder, flag="--ckpt_dir", purpose="training")
    message = str(caught.value)
    assert f"PID {pid}" in message and "--ckpt_dir" in message and "in use by another training" in message
    assert "Fix: wait for it to finish, or pass another --ckpt_dir" in message and "\n" not in message


def test_training_workflow_on_a_locked_ckpt_dir_fails_before_training(holder, tmp_path):
    folder, pid = holder
    data = write_dataset(tmp_path / "data")
    workflow = ConfigWorkflow(config_file=TRAIN, meta_file=META, logging_file=False, run_id="training",
                              bundle_root=str(REPO), dataset_dir=str(data), cache_dir=str(tmp_path / "cache"),
                              ckpt_dir=str(folder), output_dir=str(tmp_path / "runs"), **TINY_TRAIN)
    with pytest.raises(Exception) as caught:
        workflow.initialize()
    error = project_error(caught.value)  # MONAI wraps it in "Failed to evaluate ..."
    assert isinstance(error, LockError) and f"PID {pid}" in str(error)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # nothing written next to the other run


def test_inference_on_a_locked_output_dir_is_refused(holder, tmp_path):
    folder, pid = holder
    # the input apart from the output folder (an output folder inside the input one is refused: issue #33)
    workflow = ConfigWorkflow(config_file=INFERENCE, meta_file=META, workflow_type="infer", bundle_root=str(REPO),
                              dataset_dir=str(tmp_path / "in"), output_dir=str(folder))
    with pytest.raises(Exception) as caught:
        workflow.initialize()
    assert isinstance(project_error(caught.value), LockError)
    assert "--output_dir" in str(project_error(caught.value))


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "purpose": "training"}))
    try:
        assert lock_directory(tmp_path, flag="--ckpt_dir") == lock
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        release_locks()
    assert not lock.exists()


def test_a_lock_with_this_pid_that_this_process_does_not_hold_is_stale(tmp_path):
    """After a kill, a new process (e.g. in a container) may get the dead holder's PID."""
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "earlier"}))
    try:
        lock_directory(tmp_path)
        assert json.loads(lock.read_text())["started"] != "earlier"
        lock_directory(tmp_path)  # re-entrant within one process (two workflows of one program)
    finally:
        release_locks()


def test_release_leaves_another_process_lock_alone(tmp_path):
    lock_directory(tmp_path)
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))  # replaced by someone else meanwhile
    release_locks()
    assert lock.exists()


RACER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from scripts.runtime import LockError, lock_directory
    try:
        lock_directory(sys.argv[1])
        print("won", flush=True)
        sys.stdin.read()  # hold the lock until the test closes stdin
    except LockError:
        print("lost", flush=True)
""")


def test_two_processes_taking_over_one_stale_lock_only_one_wins(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    racers = [subprocess.Popen([sys.executable, "-c", RACER.format(repo=str(REPO)), str(tmp_path)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted(racer.stdout.readline().strip() for racer in racers)
    for racer in racers:
        racer.stdin.close()
        racer.wait()
    assert results == ["lost", "won"]
