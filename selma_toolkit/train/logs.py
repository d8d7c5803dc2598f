"""The loss curve of a training run: ``loss.jsonl`` (one record per optimizer step, appended
as training goes) and ``loss.png`` (redrawn at each checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selma_toolkit.io import JsonlAppender, atomic_open, atomic_write_text, read_jsonl


class LossLog:
    """Appends step records to ``<train_dir>/loss.jsonl``. Opened at a resumed step, it first
    drops records past that step (steps a crashed run did after its last checkpoint, which the
    resumed run redoes), so each step appears once."""

    def __init__(self, train_dir: Path, start_step: int):
        self.path = train_dir / "loss.jsonl"
        self.plot_path = train_dir / "loss.png"
        if self.path.exists():
            kept = [r for r in read_jsonl(self.path, repair_tail=True) if int(r.get("step", 0)) <= start_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._appender = JsonlAppender(self.path)

    def append(self, record: dict[str, Any]) -> None:
        self._appender.append(record)

    def close(self) -> None:
        self._appender.close()

    def plot(self) -> Path:
        """Draw loss.png (loss per step and a running mean) with matplotlib's file-only backend."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_jsonl(self.path, repair_tail=True)
        steps = [r["step"] for r in records]
        losses = [r["loss"] for r in records]
        window = max(1, len(losses) // 20)
        running = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        figure, axes = plt.subplots(figsize=(7, 4))
        axes.plot(steps, losses, alpha=0.35, label="loss")
        axes.plot(steps, running, label=f"mean of {window} steps")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("diffusion loss")
        axes.legend()
        figure.tight_layout()
        with atomic_open(self.plot_path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
        plt.close(figure)
        return self.plot_path
