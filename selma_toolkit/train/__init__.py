"""Stage 3: LoRA skill experts (peft + accelerate) with latent/text caches, checkpoints and resume.

``train_expert(run, skill, paths)`` trains one skill's expert; ``train_joint(run, paths)`` the
paper's baseline, one LoRA on the mixture of all skills' data; ``train_moe`` / ``train_dpo`` the
paper's Table 4 baselines (``moe.py``, ``dpo.py``). ``checkpoint_experts(train_dir)`` lists the
expert file of every checkpoint (the paper keeps the best 1,000-step checkpoint). Importing this
package imports torch.
"""

from selma_toolkit.paths import JOINT
from selma_toolkit.train.checkpoint import checkpoint_experts
from selma_toolkit.train.dpo import train_dpo
from selma_toolkit.train.loop import train_expert, train_joint
from selma_toolkit.train.moe import train_moe
from selma_toolkit.train.steps import Progress, TrainEvent

__all__ = [
    "JOINT",
    "Progress",
    "TrainEvent",
    "checkpoint_experts",
    "train_dpo",
    "train_expert",
    "train_joint",
    "train_moe",
]
