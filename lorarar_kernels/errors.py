"""The one exception family the project raises on bad input.
May import: nothing of the engine (a leaf).
"""


class LoraRarError(ValueError):
    """Bad input to lorarar: a file, a layer, a shape, a backend. The message names what and where."""


class LoraFileError(LoraRarError):
    """A LoRA or hypernetwork file that cannot be read or understood."""


class LayerMismatchError(LoraRarError):
    """A LoRA layer that does not fit the target module (missing, wrong shape, wrong dtype, non-finite)."""


class BackendUnavailableError(LoraRarError):
    """An explicitly requested backend that cannot run here."""


class TargetModifiedError(LoraRarError):
    """Weights the engine merged into were changed behind its back (a fuse, a `.to()`, offloading)."""


class StaleSwapError(LoraRarError):
    """A prepared swap overtaken by another merge, restore or prepare of the same target: prepare again."""
