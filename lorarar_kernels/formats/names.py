"""Turning kohya-style underscore names back into dotted module names.

kohya / sd-scripts write a module path with every ``.`` replaced by ``_``
(``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` ->
``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0``). The underscores inside segment names
(``to_out``, ``transformer_blocks``) make that ambiguous; we undo it with a vocabulary of the segment names
that contain underscores, taking the longest known segment at each position and a single token otherwise.
May import: nothing of the engine.
"""

from __future__ import annotations

# Segment names with underscores in diffusers' UNet2DConditionModel, the SGM/LDM UNet that kohya trains
# SDXL on, and transformers' CLIP text models. Everything else is one token per segment.
UNDERSCORE_SEGMENTS = frozenset(
    {
        # diffusers UNet
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_in", "proj_out", "conv_in", "conv_out",
        "conv_norm_out", "conv_shortcut", "time_emb_proj", "time_embedding", "linear_1", "linear_2",
        "add_embedding", "class_embedding", "encoder_hid_proj", "time_proj",
        # diffusers' Flux / SD3 transformers
        "single_transformer_blocks", "ff_context", "norm1_context", "proj_mlp", "x_embedder", "context_embedder",
        "time_text_embed", "guidance_embedder", "text_embedder", "timestep_embedder", "norm_out", "pos_embed",
        "norm_added_q", "norm_added_k",
        # SGM / LDM UNet
        "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
        "skip_connection", "time_embed", "label_emb",
        # CLIP text encoders (transformers)
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
        "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
    }
)  # fmt: skip
_MAX_TOKENS = max(s.count("_") + 1 for s in UNDERSCORE_SEGMENTS)


def dotted_name(underscored: str) -> str:
    """``"mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"`` -> ``"mid_block.attentions.0....ff.net.0.proj"``.

    Greedy longest match of `UNDERSCORE_SEGMENTS` over the ``_``-separated tokens.
    """
    tokens = underscored.split("_")
    segments: list[str] = []
    i = 0
    while i < len(tokens):
        for k in range(min(_MAX_TOKENS, len(tokens) - i), 1, -1):
            candidate = "_".join(tokens[i : i + k])
            if candidate in UNDERSCORE_SEGMENTS:
                segments.append(candidate)
                i += k
                break
        else:
            segments.append(tokens[i])
            i += 1
    return ".".join(segments)
