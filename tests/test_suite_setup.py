"""The suite's own setup (`tests/conftest.py`): pytest-xdist workers share the cores, longest files first."""

from __future__ import annotations

import os

import pytest

from .conftest import LONGEST_FILES, worker_threads

TESTS = os.path.dirname(__file__)


def test_each_of_two_workers_takes_half_the_cores_unless_omp_num_threads_says(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert worker_threads() is None  # one process: torch's own default
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert worker_threads() == 2  # 5 cores, 2 workers
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "8")
    assert worker_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_threads() is None  # the user's choice stays


def test_the_longest_files_exist():
    assert all(os.path.isfile(os.path.join(TESTS, name)) for name in LONGEST_FILES)
