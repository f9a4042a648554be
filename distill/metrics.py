"""Where training (and evaluation) numbers go: OUT/metrics.jsonl and wandb (offline by default), rank 0 only."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


class MetricsLog:
    def __init__(self, out: Path, config: dict, rank: int, mode: str = "offline", project: str = "ovi-dmd",
                 run_name: str | None = None, resume: bool = False, group: str | None = None,
                 job_type: str | None = None, step_metric: str | None = None):
        """`group`: the wandb group (default: this run's own id, so an evaluator can join it);
        `step_metric`: log the step as this metric and plot everything against it, instead of
        wandb's own step (an evaluator logs training steps, which wandb's step may not accept
        after a resume)."""
        self.enabled = rank == 0
        self.run = None
        self.step_metric = step_metric
        if not self.enabled:
            return
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_line(self.path)
        if mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb
            run_id = self._run_id(out, resume)
            self.run = wandb.init(project=project, name=run_name, dir=str(out), config=config, mode=mode,
                                  resume="allow" if resume else None, id=run_id, group=group or run_id,
                                  job_type=job_type)
            if step_metric:
                self.run.define_metric(step_metric)
                self.run.define_metric("*", step_metric=step_metric)

    @staticmethod
    def _run_id(out: Path, resume: bool) -> str | None:
        """One wandb run per output directory, so a resumed job continues the same run."""
        id_file = Path(out) / "wandb_run_id"
        if resume and id_file.exists():
            return id_file.read_text().strip()
        run_id = secrets.token_hex(4)
        id_file.write_text(run_id)
        return run_id

    def log(self, step: int, values: dict, notes: dict | None = None, media: dict[str, Path] | None = None) -> None:
        """`values` (numbers) go to metrics.jsonl and wandb; `notes` (e.g. a skipped step's sample keys)
        to metrics.jsonl only; `media` (name -> .png or .mp4 file) to wandb only."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values, **(notes or {})}) + "\n")
        if self.run is not None:
            row = {**values, **{name: self._media(path) for name, path in (media or {}).items()}}
            if self.step_metric:
                self.run.log({**row, self.step_metric: step})
            else:
                self.run.log(row, step=step)

    @staticmethod
    def _media(path: Path):
        import wandb
        if Path(path).suffix == ".mp4":
            return wandb.Video(str(path), format="mp4")
        return wandb.Image(str(path))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def drop_torn_line(path: Path) -> None:
    """A run killed mid-write leaves a last line without its newline; the resumed run's first
    line would be glued onto it. Cut it off."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
