"""Training and evaluation on top of diffusers: the diffusion-model view (`diffusion`), the pair manifest
(`manifest`), the low-rank merged forward (`lowrank`), hypernetwork training (`hypernet_trainer`), the
ZipLoRA baseline (`ziplora`), scores (`scores`) and single-LoRA training (`lora_trainer`)."""
