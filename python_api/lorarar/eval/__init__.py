"""Evaluation of content/style LoRA merges (issue 14): the merge methods compared (`methods`: LoRA.rar's
hypernetwork, direct merge, ZipLoRA, K-LoRA (`klora`), PEFT's weighted-adapter merges (`peft_merge`)),
generation and scoring over a manifest's pairs (`run`), the toy world's objective judges (`toy_judge`) and
the reports (`report`)."""
