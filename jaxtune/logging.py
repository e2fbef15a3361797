"""jaxtune's log: one `logging` logger for people (warnings, progress lines).

Warnings about configuration are emitted once each per process (`warn_once`), so a key that means
nothing on JAX is reported exactly one time however often the config is resolved.
"""

from __future__ import annotations

import logging as _logging
import sys

logger = _logging.getLogger("jaxtune")
_warned: set[str] = set()
_told: set[str] = set()


def _ensure_handler() -> None:
    # Our own handler: libraries (absl via orbax) configure the root logger at WARNING.
    if not logger.handlers:
        handler = _logging.StreamHandler(sys.stderr)
        handler.setFormatter(_logging.Formatter("jaxtune: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(_logging.INFO)
        logger.propagate = False


def info(message: str) -> None:
    _ensure_handler()
    logger.info(message)


def info_once(message: str) -> None:
    """An info line emitted once per process (a backend fallback noticed at every trace)."""
    if message not in _told:
        _told.add(message)
        info(message)


def warn(message: str) -> None:
    _ensure_handler()
    logger.warning(message)


def warn_once(message: str) -> None:
    if message in _warned:
        return
    _warned.add(message)
    warn(message)


def keep_until(path, step: int) -> None:
    """Drop the records of a jsonl file past `step` (and lines cut by a crash): a resumed run's
    files describe exactly the trajectory that continues."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _start_wandb(wandb, settings: dict, config: dict | None):
    run = wandb.init(config=config, resume="allow", **settings)
    return run.log, run.finish


def _start_trackio(trackio, settings: dict, config: dict | None):
    trackio.init(config=config, resume="allow", **settings)
    return trackio.log, trackio.finish


def _start_swanlab(swanlab, settings: dict, config: dict | None):
    import os

    settings = dict(settings)
    for key in ("api_key", "api_host", "web_host"):  # read from the environment by every swanlab version
        value = settings.pop(key, None)
        if value:
            os.environ[f"SWANLAB_{key.upper()}"] = value
    if settings.get("mode", "cloud") == "cloud" and not os.environ.get("SWANLAB_API_KEY"):
        warn_once("SwanLab cloud mode with no API key: unless `swanlab login` was run, swanlab may ask for one "
                  "or fail (set SWANLAB_API_KEY, or swanlab_mode: local)")
    webhook, secret = settings.pop("lark_webhook_url", None), settings.pop("lark_secret", None)
    if webhook:
        try:
            from swanlab.plugin.notification import LarkCallback
        except ImportError:
            warn_once("swanlab_lark_webhook_url is set but this swanlab has no Lark notifications (swanlab.plugin)")
        else:
            settings["callbacks"] = [LarkCallback(webhook_url=webhook, secret=secret)]
    swanlab.init(config=config, **settings)
    return swanlab.log, swanlab.finish


# tracker (its package) -> (its name for people, how it starts: returns its log and finish functions)
TRACKERS = {"wandb": ("W&B", _start_wandb), "trackio": ("Trackio", _start_trackio),
            "swanlab": ("SwanLab", _start_swanlab)}


class MetricsWriter:
    """output_dir/metrics.jsonl (one JSON object per record), plus TensorBoard and the experiment
    trackers (W&B, Trackio, SwanLab) when enabled: each is given the run's config at the start, every
    record's scalars at its step, and is finished at the end. A tracker that is not installed (or
    fails to start) is one warning, never a crash.

    On resume, records past the resumed step are dropped first, so the file describes exactly the
    trajectory that continues.
    """

    def __init__(self, output_dir, *, resume_step: int = 0, tensorboard: bool = False, wandb_config=None,
                 trackers: dict[str, dict] | None = None, run_config: dict | None = None, primary: bool = True):
        """`trackers`: tracker name -> its settings (`config.trackers.tracker_settings`); `wandb_config`
        is the W&B entry alone. `primary`: False on every process but 0 of a multi-host run (they write
        nothing)."""
        import json
        from pathlib import Path

        self._json = json
        self._file = self._tb = None
        self._trackers: list = []  # (name, log, finish)
        if not primary:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_until(self.path, resume_step)
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "events"))
        trackers = dict(trackers or {})
        if wandb_config and wandb_config.get("project"):
            trackers.setdefault("wandb", wandb_config)
        for name, settings in trackers.items():
            self._start(name, settings, run_config)

    def _start(self, name: str, settings: dict, run_config: dict | None) -> None:
        import importlib

        label, start = TRACKERS[name]
        try:
            module = importlib.import_module(name)
        except ImportError:
            warn_once(f"{label} logging is configured but {name} is not installed: metrics go to metrics.jsonl "
                      "(and the other trackers) only")
            return
        except Exception as exc:  # installed but broken
            warn_once(f"{name} could not be imported ({type(exc).__name__}: {exc}): no {label} logging")
            return
        try:
            log, finish = start(module, settings, run_config)
        except Exception as exc:  # a dashboard out of reach must not stop training
            warn_once(f"{label} could not start ({type(exc).__name__}: {exc}): metrics go to metrics.jsonl "
                      "(and the other trackers) only")
            return
        self._trackers.append((name, log, finish))

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(self._json.dumps(record) + "\n")
        self._file.flush()
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        for _, log, _ in self._trackers:
            log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        for _, _, finish in self._trackers:
            finish()
        self._trackers = []


# Objective metrics the progress bar and log lines show when a step has them (TRL's names).
SHOWN_METRICS = ("reward", "rewards/accuracies", "rewards/margins", "kl", "nll_loss")


class Progress:
    """A progress bar (step, loss, tokens/s, the objective's headline metrics, ETA) on a terminal;
    plain log lines otherwise."""

    def __init__(self, total: int, initial: int, every: int):
        self.total, self.every = total, every
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, record: dict) -> None:
        if self._bar is not None:
            self._bar.update(1)
            shown = {k.split("/")[-1]: f"{record[k]:.3f}" for k in SHOWN_METRICS if k in record}
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}", **shown)
        elif step % self.every == 0 or step == self.total:
            shown = "".join(f" {k} {record[k]:.4g}" for k in SHOWN_METRICS if k in record)
            info(f"step {step}/{self.total} loss {record['loss']:.4f} lr {record['lr']:.3g} "
                 f"grad_norm {record['grad_norm']:.3g} tokens/s {record['tokens_per_sec']:.0f}{shown}")

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            info(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
