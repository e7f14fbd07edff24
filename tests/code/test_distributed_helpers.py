"""upbeat/distributed.py and the device/processes parameters, in one process (no process group).

The helpers must be exact no-ops with one process (the default path stays what it was); the
launch checks must refuse what cannot run, naming the parameter. The 2-process behaviour is in
tests/model/test_distributed.py and tests/e2e/test_distributed_stages.py.
"""

from __future__ import annotations

import pytest
import torch

from upbeat import distributed
from upbeat.config import ConfigError, load_params
from upbeat.models import DeviceError, resolve_device


def test_one_process_helpers_change_nothing() -> None:
    assert (distributed.size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_sum(t) is t and distributed.all_rows(t) is t
    assert distributed.broadcast({"step": 3}) == {"step": 3}
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([0.5, -1.0])
    distributed.sum_gradients([p])
    assert p.grad.tolist() == [0.5, -1.0]


def test_processes_must_divide_the_batches() -> None:
    with pytest.raises(ConfigError, match=r"ppo\.minibatch_size \(16\) must be a multiple of "):
        load_params(overrides=["ppo.processes=3"])
    with pytest.raises(ConfigError, match=r"sft\.batch_size \(16\) must be a multiple of sft"):
        load_params(overrides=["sft.processes=3"])
    with pytest.raises(ConfigError, match=r"sft\.processes: Input should be greater than or"):
        load_params(overrides=["sft.processes=0"])
    with pytest.raises(ConfigError, match=r"policy\.device: Input should be 'auto', 'cpu'"):
        load_params(overrides=["policy.device=gpu"])
    params = load_params(overrides=["ppo.processes=4", "sft.processes=2"])
    assert (params.ppo.processes, params.sft.processes) == (4, 2)


def test_more_processes_than_gpus_is_refused_naming_the_key() -> None:
    too_many = torch.cuda.device_count() + 1
    with pytest.raises(distributed.LaunchError, match=rf"ppo\.processes: {too_many} processes"):
        distributed.check_processes(too_many, "cuda", "ppo.processes")
    distributed.check_processes(too_many, "cpu", "ppo.processes")  # CPU processes: no limit


def test_a_torchrun_of_another_count_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(distributed.LAUNCHED_ENV, "run-1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(distributed.LaunchError, match=r"sft\.processes is 1, but torchrun"):
        distributed.check_processes(1, "cpu", "sft.processes")
    policy = load_params().policy
    assert distributed.relaunch(2, policy, "sft.processes") is None  # already launched: run here


def test_one_process_is_not_relaunched() -> None:
    assert distributed.relaunch(1, load_params().policy, "ppo.processes") is None


def test_device_auto_follows_cuda_and_cuda_without_a_gpu_says_what_to_do() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: `cuda` resolves (benchmarks/gpu_check.py covers it)")
    with pytest.raises(DeviceError, match=r"policy\.device: cuda, but torch sees no CUDA"):
        resolve_device("cuda")
