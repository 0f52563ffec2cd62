"""Multi-host detection from the launcher's environment (initialisation itself needs several hosts)."""

import pytest

from qlx.distributed import multi_process_environment

CLUSTER_VARS = ("QLX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_left_alone():
    assert multi_process_environment() is None


@pytest.mark.parametrize(
    "env", [{"SLURM_NTASKS": "4"}, {"OMPI_COMM_WORLD_SIZE": "2"}, {"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}]
)
def test_cluster_environments_use_jax_detection(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert multi_process_environment() == {}
    monkeypatch.setenv("QLX_DISTRIBUTED", "off")
    assert multi_process_environment() is None


def test_explicit_coordinator(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "8")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert multi_process_environment() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 8, "process_id": 3}


@pytest.mark.parametrize(("name", "value"), [("QLX_DISTRIBUTED", "yes"), ("SLURM_NTASKS", "four")])
def test_bad_values_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        multi_process_environment()
