"""Evaluation of content/style LoRA merges (issue 14): the merge methods compared (`methods`: LoRA.rar's
hypernetwork, direct merge, ZipLoRA, K-LoRA (`klora`), PEFT's weighted-adapter merges (`peft_merge`)),
generation and judging over a manifest's pairs (`run`), the judges (`toy_judge`: the toy world's objective
classifier; `mllm`: the authors' MLLM protocol; `embed_scores`: CLIP-I, CLIP-T, DINO) and the reports
(`report`)."""
