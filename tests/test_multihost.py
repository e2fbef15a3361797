"""`python -m jaxtune.train` across processes and meshes, on a tiny model (subprocesses with forced
CPU devices):

- two processes x 4 devices joined by jax.distributed on 127.0.0.1 (JAXTUNE_COORDINATOR /
  JAXTUNE_NUM_PROCESSES / JAXTUNE_PROCESS_ID) give the losses, eval loss and exports of one process
  x 8 devices on the same mesh (data=2 x fsdp=4); each process loads its own rows and only
  process 0 writes;
- a checkpoint saved on 8 devices resumes on 4 (micro_batch_size doubled, so the global batch is the
  same) and continues the 8-device trajectory.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from conftest import cpu_env

DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "quickstart_train.jsonl"


def _config(tmp_path: Path, model_dir: Path, name: str, **keys) -> Path:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(DATA.read_text().splitlines(keepends=True)[:96]))
    cfg = {"base_model": str(model_dir), "datasets": [{"path": str(data), "type": "chat_template"}],
           "val_set_size": 16, "sequence_len": 128, "sample_packing": True, "micro_batch_size": 1,
           "max_steps": 5, "learning_rate": 2e-3, "lr_scheduler": "constant", "adapter": "lora",
           "lora_target_linear": True, "lora_r": 4, "lora_alpha": 8, "dp_shard_size": 4, "save_steps": 3,
           "eval_steps": 5, "output_dir": str(tmp_path / name), "dataset_prepared_path": str(tmp_path / "prep"),
           "attn_implementation": "blockwise", **keys}
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, devices: int, extra_env: dict | None = None) -> subprocess.Popen:
    env = cpu_env(devices, **(extra_env or {}))
    return subprocess.Popen([sys.executable, "-m", "jaxtune.train", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(*procs: subprocess.Popen) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-4000:]


def _losses(output_dir: Path) -> tuple[dict, dict]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in records if "loss" in r},
            {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def eight(tmp_path_factory, tiny_chat_dir):
    """One process x 8 devices, data=2 x fsdp=4, 5 steps (checkpoints at 3 and 5)."""
    tmp = tmp_path_factory.mktemp("multihost")
    _finish(_launch(_config(tmp, tiny_chat_dir, "eight"), 8))
    return tmp


def test_two_processes_equal_one(eight, tiny_chat_dir):
    config = _config(eight, tiny_chat_dir, "two")
    port = _free_port()
    procs = [_launch(config, 4, {"JAXTUNE_COORDINATOR": f"127.0.0.1:{port}", "JAXTUNE_NUM_PROCESSES": "2",
                                 "JAXTUNE_PROCESS_ID": str(i)}) for i in range(2)]
    _finish(*procs)
    (one, one_eval), (two, two_eval) = _losses(eight / "eight"), _losses(eight / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
    np.testing.assert_allclose(two_eval[5], one_eval[5], rtol=1e-5)
    for sub, name in (("hf", "model.safetensors"), ("adapter", "adapter_model.safetensors")):
        a, b = load_file(str(eight / "eight" / sub / name)), load_file(str(eight / "two" / sub / name))
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert sorted(p.name for p in (eight / "two" / "checkpoints").iterdir()) == ["3", "5"]


def test_checkpoint_from_8_devices_resumes_on_4(eight, tiny_chat_dir):
    # the same micro_batch_size on half the ranks would read the data differently: a clear error
    wrong = _launch(_config(eight, tiny_chat_dir, "four_wrong",
                            resume_from_checkpoint=str(eight / "eight" / "checkpoints" / "3")), 4)
    out, _ = wrong.communicate(timeout=600)
    assert wrong.returncode == 2 and "read 8 rows per step on each of 1 host share(s); this run reads 4" in out, out
    config = _config(eight, tiny_chat_dir, "four", micro_batch_size=2,
                     resume_from_checkpoint=str(eight / "eight" / "checkpoints" / "3"))
    _finish(_launch(config, 4))
    (one, one_eval), (four, four_eval) = _losses(eight / "eight"), _losses(eight / "four")
    assert sorted(four) == [4, 5]
    np.testing.assert_allclose([four[4], four[5]], [one[4], one[5]], rtol=1e-5)
    np.testing.assert_allclose(four_eval[5], one_eval[5], rtol=1e-5)
