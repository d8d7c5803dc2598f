"""The layout of a run folder: one place that says where each stage reads and writes.

```
runs/<name>/
  recipe.toml, recipe.sha256      the fully resolved recipe and its hash
  skills/<skill>/prompts.jsonl    stage 1
  skills/<skill>/images/          stage 2: imagefolder (images, .txt captions, metadata.jsonl)
  skills/<skill>/train/           stage 3: cache/, checkpoints/, loss.csv, loss.png
  experts/<skill>.safetensors     stage 3 output (joint.safetensors for the mixture baseline)
  merged/<method>.safetensors     stage 4
  eval/                           evaluation images and scores.json
  eval/checkpoints/selection.json the best checkpoint of each skill
  report/index.html               the report
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

JOINT = "joint"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def for_recipe(cls, recipe, out: str | Path | None = None) -> RunPaths:
        """``out`` if given, else the recipe's output_dir, else runs/<name>."""
        return cls(Path(out or recipe.output_dir or Path("runs") / recipe.name))

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.toml"

    def skill_dir(self, skill: str) -> Path:
        return self.root / "skills" / skill

    def prompts(self, skill: str) -> Path:
        return self.skill_dir(skill) / "prompts.jsonl"

    def images(self, skill: str) -> Path:
        return self.skill_dir(skill) / "images"

    def train_dir(self, skill: str) -> Path:
        """Training state of one expert (``skill``) or of the mixture baseline (``JOINT``)."""
        return (self.root / JOINT if skill == JOINT else self.skill_dir(skill)) / "train"

    def expert(self, skill: str) -> Path:
        return self.root / "experts" / f"{skill}.safetensors"

    def merged(self, method: str) -> Path:
        return self.root / "merged" / f"{method}.safetensors"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def selection(self) -> Path:
        """The checkpoint selection (evaluate/checkpoints.py): the best checkpoint of each skill."""
        return self.eval_dir / "checkpoints" / "selection.json"

    @property
    def report(self) -> Path:
        return self.root / "report" / "index.html"
