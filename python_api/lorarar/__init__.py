"""lorarar: LoRA.rar merges for diffusers pipelines, on top of the `lorarar_kernels` engine.

    import lorarar, lorarar_kernels as lk
    swapper = lorarar.attach(pipe, lk.Hypernet.load("hypernet.pth"))
    swapper.swap("dog.safetensors", "watercolour.safetensors")
    image = swapper("a sks dog in watercolour style").images[0]

Importing this package does not import diffusers; `lorarar.tiny` (the offline test pipeline) does.
"""

from .pipeline import Swapper, attach

__all__ = ["Swapper", "attach"]
