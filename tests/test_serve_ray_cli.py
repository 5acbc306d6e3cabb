"""`phi3v serve --ray` without a cluster: usage errors, the missing extra, and what each replica gets.

The deployment itself is tested on a real local Ray cluster in test_server_ray.py; these checks
need no Ray and take milliseconds.
"""

from __future__ import annotations

import os
import sys

import pytest

from phi3v.cli.main import build_parser
from phi3v.cli.serve import served_settings
from phi3v.cli.serve_ray import replica_plan
from phi3v.errors import Phi3VError


def test_without_ray_installed_names_the_extra(run_cli, monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    code, _, err = run_cli("serve", "--model", tiny_model_dir, "--ray", "--replicas", "2")
    assert code == 1
    assert "phi3v serve --ray needs the 'ray' extra" in err and "pip install 'phi3v[ray]'" in err


def test_replicas_need_ray(run_cli, tiny_model_dir):
    code, _, err = run_cli("serve", "--model", tiny_model_dir, "--replicas", "2")
    assert code == 1 and "--replicas needs --ray" in err


def parse(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_ray_flag_without_address_means_a_local_instance():
    assert parse("--ray").ray == "local"
    assert parse("--ray", "10.0.0.5:6379", "--replicas", "3").ray == "10.0.0.5:6379"
    assert parse().ray is None


def test_replica_plan_cpu_and_gpu(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    args = parse("--model", tiny_model_dir.name, "--dtype", "float32", "--ray", "--ray-cpus-per-replica", "2",
                 "--api-key", "k")
    spec, options = replica_plan(args, served_settings(args), {"CPU": 8.0})
    # A local folder travels as an absolute path: the replicas do not share the driver's folder.
    assert spec.model == os.path.abspath(tiny_model_dir.name) and os.path.isabs(spec.model)
    assert (spec.device, spec.dtype, spec.torch_threads) == ("cpu", "float32", 2)
    assert spec.settings.api_key == "k"
    assert options == {"num_cpus": 2.0, "num_gpus": 0}

    on_gpus = parse("--model", "microsoft/Phi-3.5-vision-instruct", "--ray", "auto")
    spec, options = replica_plan(on_gpus, served_settings(on_gpus), {"CPU": 8.0, "GPU": 2.0})
    assert (spec.model, spec.device, spec.dtype) == ("microsoft/Phi-3.5-vision-instruct", "cuda", None)
    assert options == {"num_cpus": 1.0, "num_gpus": 1}

    with pytest.raises(Phi3VError, match="has none"):
        cuda = parse("--model", "m", "--device", "cuda:1", "--ray")
        replica_plan(cuda, served_settings(cuda), {"CPU": 8.0})
