"""Experiment trackers beyond metrics.jsonl (W&B, Trackio, SwanLab), as Axolotl configures them: fake
tracker modules record what `MetricsWriter` gives them; the config keys validate as Axolotl's do."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

import jaxtune.config.trackers as trackers_cfg
import jaxtune.logging as jlog
from jaxtune.config import ConfigError, build_config
from jaxtune.config.trackers import run_config, tracker_settings
from jaxtune.logging import MetricsWriter

RECORDS = [{"step": 1, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.7, "tokens_per_sec": 1000.0, "epoch": 0.5},
           {"step": 2, "loss": 2.0, "lr": 2e-4, "grad_norm": 0.6, "tokens_per_sec": 1100.0, "epoch": 1.0,
            "rewards/margins": 0.25},
           {"step": 2, "eval_loss": 1.9}]


def _fake(monkeypatch, name: str) -> list:
    """Put a module `name` with init/log/finish that record their calls into sys.modules."""
    calls: list = []
    module = types.ModuleType(name)
    module.init = lambda **kw: calls.append(("init", kw))
    module.log = lambda data, step=None: calls.append(("log", dict(data), step))
    module.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.fixture
def warned(monkeypatch) -> list[str]:
    """Every warning (not deduplicated across tests as warn_once is per process)."""
    seen: list[str] = []
    monkeypatch.setattr(jlog, "warn_once", seen.append)
    monkeypatch.setattr(trackers_cfg, "warn_once", seen.append)
    return seen


def _run(tmp_path, cfg, primary: bool = True) -> list[dict]:
    writer = MetricsWriter(tmp_path, trackers=tracker_settings(cfg), run_config=run_config(cfg), primary=primary)
    for record in RECORDS:
        writer.write(record)
    writer.close()
    path = tmp_path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _scalars(jsonl: list[dict]) -> list[tuple[dict, int]]:
    return [({k: v for k, v in r.items() if k != "step"}, r["step"]) for r in jsonl]


def test_trackio_logs_the_jsonl_scalars(tmp_path, monkeypatch, warned):
    calls = _fake(monkeypatch, "trackio")
    cfg = build_config({"trackio_project_name": "proj", "trackio_run_name": "run-1", "trackio_space_id": "me/dash",
                        "learning_rate": 3e-4})
    jsonl = _run(tmp_path, cfg)
    assert calls[0][0] == "init"
    init = calls[0][1]
    assert (init["project"], init["name"], init["space_id"]) == ("proj", "run-1", "me/dash")
    assert init["config"]["learning_rate"] == 3e-4 and init["config"]["trackio_run_name"] == "run-1"
    assert [(c[1], c[2]) for c in calls if c[0] == "log"] == _scalars(jsonl)
    assert len(jsonl) == 3 and calls[-1] == ("finish",)
    assert not warned


def test_swanlab_logs_the_jsonl_scalars(tmp_path, monkeypatch, warned):
    calls = _fake(monkeypatch, "swanlab")
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.delenv("SWANLAB_API_HOST", raising=False)
    cfg = build_config({"swanlab_project": "proj", "swanlab_experiment_name": "exp", "swanlab_mode": "local",
                        "swanlab_workspace": "team", "swanlab_description": "a test", "swanlab_api_key": "secret",
                        "swanlab_api_host": "https://api.example"})
    jsonl = _run(tmp_path, cfg)
    init = calls[0][1]
    assert {k: init[k] for k in ("project", "experiment_name", "mode", "workspace", "description")} == {
        "project": "proj", "experiment_name": "exp", "mode": "local", "workspace": "team", "description": "a test"}
    assert "api_key" not in init and "swanlab_api_key" not in init["config"]  # never logged with the config
    assert os.environ["SWANLAB_API_KEY"] == "secret" and os.environ["SWANLAB_API_HOST"] == "https://api.example"
    assert [(c[1], c[2]) for c in calls if c[0] == "log"] == _scalars(jsonl)
    assert calls[-1] == ("finish",)
    assert not warned


def test_swanlab_lark_notifications(tmp_path, monkeypatch, warned):
    calls = _fake(monkeypatch, "swanlab")
    notification = types.ModuleType("swanlab.plugin.notification")

    class LarkCallback:
        def __init__(self, webhook_url, secret=None):
            self.webhook_url, self.secret = webhook_url, secret

    notification.LarkCallback = LarkCallback
    monkeypatch.setitem(sys.modules, "swanlab.plugin", types.ModuleType("swanlab.plugin"))
    monkeypatch.setitem(sys.modules, "swanlab.plugin.notification", notification)
    cfg = build_config({"swanlab_project": "p", "swanlab_mode": "offline", "swanlab_lark_webhook_url": "https://hook",
                        "swanlab_lark_secret": "s"})
    _run(tmp_path, cfg)
    (callback,) = calls[0][1]["callbacks"]
    assert (callback.webhook_url, callback.secret) == ("https://hook", "s")
    assert "swanlab_lark_secret" not in calls[0][1]["config"]


def test_all_trackers_together_and_use_wandb(tmp_path, monkeypatch, warned):
    """use_wandb: true alone logs to $WANDB_PROJECT or 'huggingface' (HF's Trainer, as Axolotl runs it);
    wandb_run_id without wandb_name names the run after the id (Axolotl)."""
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    runs: list = []

    class Run:
        def __init__(self, **kw):
            runs.append(("init", kw))

        def log(self, data, step=None):
            runs.append(("log", dict(data), step))

        def finish(self):
            runs.append(("finish",))

    wandb = types.ModuleType("wandb")
    wandb.init = Run
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    trackio, swanlab = _fake(monkeypatch, "trackio"), _fake(monkeypatch, "swanlab")
    cfg = build_config({"use_wandb": True, "wandb_run_id": "abc", "use_trackio": True, "swanlab_project": "s",
                        "swanlab_mode": "local"})
    jsonl = _run(tmp_path, cfg)
    assert {k: runs[0][1][k] for k in ("project", "name", "id")} == {"project": "huggingface", "name": "abc",
                                                                     "id": "abc"}
    assert trackio[0][1]["project"] == "huggingface" and swanlab[0][1]["project"] == "s"
    for calls in (runs, trackio, swanlab):
        assert [(c[1], c[2]) for c in calls if c[0] == "log"] == _scalars(jsonl)
        assert calls[-1] == ("finish",)


@pytest.mark.parametrize("name,keys", [("trackio", {"trackio_project_name": "p"}),
                                       ("swanlab", {"swanlab_project": "p", "swanlab_mode": "local"})])
def test_tracker_not_installed_is_one_warning(tmp_path, monkeypatch, warned, name, keys):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    jsonl = _run(tmp_path, build_config(keys))
    assert len(jsonl) == 3
    assert len(warned) == 1 and f"{name} is not installed" in warned[0]


def test_tracker_failing_to_start_is_one_warning(tmp_path, monkeypatch, warned):
    calls = _fake(monkeypatch, "trackio")

    def init(**kw):
        raise ConnectionError("no network")

    sys.modules["trackio"].init = init
    jsonl = _run(tmp_path, build_config({"trackio_project_name": "p"}))
    assert len(jsonl) == 3 and calls == []
    assert len(warned) == 1 and "Trackio could not start" in warned[0] and "no network" in warned[0]


def test_only_the_main_process_logs(tmp_path, monkeypatch, warned):
    calls = _fake(monkeypatch, "trackio")
    assert _run(tmp_path, build_config({"trackio_project_name": "p"}), primary=False) == []
    assert calls == []


def test_disabled_mode_starts_nothing():
    cfg = build_config({"swanlab_project": "p", "swanlab_mode": "disabled", "wandb_project": "w",
                        "wandb_mode": "disabled"})
    assert tracker_settings(cfg) == {}


def test_tracker_keys_validate():
    keys = {"use_trackio": True, "trackio_project_name": "p", "trackio_run_name": "r", "trackio_space_id": "u/s",
            "use_swanlab": True, "swanlab_project": "p", "swanlab_experiment_name": "e", "swanlab_description": "d",
            "swanlab_mode": "cloud", "swanlab_workspace": "w", "swanlab_api_key": "k", "swanlab_web_host": "https://w",
            "swanlab_api_host": "https://a", "swanlab_lark_webhook_url": "https://l", "swanlab_lark_secret": "x",
            "use_wandb": True, "wandb_project": "wp"}
    cfg = build_config(keys)
    assert {k: getattr(cfg, k) for k in keys} == keys
    assert set(tracker_settings(cfg)) == {"wandb", "trackio", "swanlab"}


@pytest.mark.parametrize("keys,message", [
    ({"trackio_projet_name": "p"}, "did you mean 'trackio_project_name'"),
    ({"swanlab_experiment": "e"}, "unknown config key 'swanlab_experiment'"),
    ({"use_swanlab": True}, "needs swanlab_project"),
    ({"swanlab_project": "  "}, "cannot be an empty string"),
    ({"swanlab_project": "p", "swanlab_mode": "online"}, "swanlab_mode"),
])
def test_tracker_key_errors(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config(keys)


def test_tracker_keys_that_do_nothing_warn_once(warned):
    build_config({"swanlab_project": "p", "swanlab_log_model": True, "swanlab_log_completions": True,
                  "swanlab_completion_log_interval": 10})
    assert sorted(w.split("'")[1] for w in warned) == ["swanlab_completion_log_interval", "swanlab_log_completions",
                                                       "swanlab_log_model"]
    warned.clear()
    build_config({"swanlab_project": "p", "swanlab_log_completions": False})
    assert warned == []


def test_keys_of_a_tracker_that_is_off_warn(warned):
    cfg = build_config({"trackio_run_name": "r", "swanlab_experiment_name": "e"})
    assert tracker_settings(cfg) == {}
    assert any("trackio_run_name is set but Trackio is off" in w for w in warned)
    assert any("swanlab_experiment_name is set but SwanLab is off" in w for w in warned)


def test_use_false_does_not_override_the_project(warned):
    """As in Axolotl, the project key turns the tracker on even over use_<tracker>: false."""
    cfg = build_config({"use_trackio": False, "trackio_project_name": "p"})
    assert tracker_settings(cfg)["trackio"]["project"] == "p"
    assert any("use_trackio: false does not turn Trackio off" in w for w in warned)
