"""The offline toy world: procedurally drawn subjects and styles (`draw`), a tiny pixel-space base model
(`base`), the one-command build of images, base, LoRAs, manifest and hypernetwork (`build`), and the
shipped trained world (`assets`)."""
