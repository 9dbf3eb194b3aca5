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


class NonFiniteError(LoraRarError):
    """A pass over the weights wrote +-Inf or NaN (after rounding to the weight's dtype), seen by the
    kernel on its write-back. Raised by every backend's ``run()`` after the pass has written; a swap's
    transaction then rolls back (keep_original "device"/"host": the state before, bit for bit; "none": no
    snapshot, so the target is marked broken and ``restore()`` says to reload the weights).
    ``layer`` is the first such layer of the pass (None when the backend cannot say which)."""

    def __init__(self, message: str, layer: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer


def non_finite(layer: str | None, dtype: object, backend: str) -> NonFiniteError:
    """The `NonFiniteError` of a pass that wrote a non-finite value into ``layer`` (a ``dtype`` weight)."""
    where = f"layer {layer!r}" if layer is not None else "a layer"
    return NonFiniteError(
        f"{where}: merging would write Inf or NaN into its {str(dtype).replace('torch.', '')} weights "
        f"({backend} backend): the delta overflows the weight's range, or a LoRA factor holds NaN/Inf "
        "(e.g. changed in place through .data after it was checked); lower the LoRA scale or coefficients, "
        "or check the LoRA files and the model's weights. A swap rolls back (keep_original 'device'/'host'); "
        "with 'none' the weights must be reloaded",
        layer,
    )
