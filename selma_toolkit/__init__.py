"""selma-toolkit: skill-specific LoRA experts for text-to-image models, the SELMA way.

Importing the package is cheap on purpose (no torch, diffusers or network): the CLI and the
ComfyUI node pack import it at start-up. Heavy modules are imported by the stage that needs them.
"""

__version__ = "0.1.0"
