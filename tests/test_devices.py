"""GPU slot assignment: concurrent jobs never share a device; SLURM's own grant is respected."""

import json
import multiprocessing as mp
import time

from cxrflow.devices import acquire_slot, visible_devices


def _hold_slot(devices, lock_dir, hold_s, out_queue):
    slot = acquire_slot(devices, lock_dir, timeout_s=30, poll_s=0.05)
    out_queue.put(json.dumps({"visible": slot.visible_id, "start": time.time()}))
    time.sleep(hold_s)
    out_queue.put(json.dumps({"visible": slot.visible_id, "end": time.time()}))
    slot.release()


def test_two_concurrent_jobs_never_share_a_slot(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # Four jobs on two fake devices: two at a time, each on a different device, the others wait.
    jobs = [ctx.Process(target=_hold_slot, args=(["0", "1"], str(tmp_path), 0.6, queue)) for _ in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
        assert job.exitcode == 0
    events = [json.loads(queue.get(timeout=5)) for _ in range(8)]
    intervals = {}
    starts = [e for e in events if "start" in e]
    ends = [e for e in events if "end" in e]
    assert len(starts) == len(ends) == 4
    # For each device, its holding intervals must not overlap.
    for device in {"0", "1"}:
        spans = sorted(zip(sorted(e["start"] for e in starts if e["visible"] == device),
                           sorted(e["end"] for e in ends if e["visible"] == device)))
        intervals[device] = spans
        for (s1, e1), (s2, _) in zip(spans, spans[1:]):
            assert s2 >= e1 - 0.01, f"device {device} held twice at once: {spans}"
    assert all(intervals.values()), "both devices were used"


def test_cuda_visible_devices_is_respected(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_devices(2) == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_devices(2) == ["0", "1"]
    assert visible_devices(0) == []


def test_under_slurm_the_granted_device_is_used_without_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    first = acquire_slot(["7"], tmp_path)
    second = acquire_slot(["7"], tmp_path)  # another job on another card that it also sees as its only device
    assert first.device == second.device == "cuda:0" and first.visible_id == "7"
    assert not list(tmp_path.iterdir())


def test_no_gpu_means_cpu():
    assert acquire_slot([]).device == "cpu"
