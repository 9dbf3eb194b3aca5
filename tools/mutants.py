"""The hand-written mutants of `tools/mutate.py`: deliberate bugs in the engine, the integration's swap code
and the CPU kernels, each a text substitution that must match its file exactly once.

A mutant is `Mutant(id, file, ((old, new), ...), tests, fast=..., accepted=...)` (a substitution may be
``(other file, old, new)``; ``every=True`` replaces every match instead of exactly one): ``tests`` are the pytest
targets that should fail on it; ``fast`` puts it in the reduced set the default suite runs
(tests/test_mutation.py); ``accepted`` is the reason a survivor is equivalent or accepted (it then does not
count against the score). Ids say which promise breaks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    subs: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]
    fast: bool = False
    accepted: str = ""
    every: bool = False
    # the cpp kernel path (`lorarar_kernels.ops.cpu_isa.PATHS`) the mutated code runs on, when only one does:
    # on a CPU without it no test can reach the mutant, which is then reported "not run here", not survived
    cpu_path: str = ""

    def edits(self) -> list[tuple[str, str, str]]:
        """``[(file, old, new)]``."""
        return [(self.file, *sub) if len(sub) == 2 else tuple(sub) for sub in self.subs]

    @property
    def native(self) -> bool:
        return any(f.startswith("csrc/") for f, _, _ in self.edits())


ORACLE = ("tests/test_oracle.py",)
ENGINE = ("tests/test_oracle.py", "tests/test_merge.py", "tests/test_merge_state.py", "tests/test_rule.py")
TIES = ("tests/test_ops_ties.py", "tests/test_ops_native.py")
NATIVE = ("tests/test_ops_ties.py", "tests/test_ops_native.py", "tests/test_ops_native_sources.py",
          "tests/test_ops_pack.py", "tests/test_oracle.py")  # fmt: skip

MUTANTS: tuple[Mutant, ...] = (
    # ---- the six survivors of issue 16, and the weak spots it names
    Mutant(
        "style-only-layers-dropped",
        "lorarar_kernels/rule.py",
        (
            (
                "names = list(c_layers) + [n for n in s_layers if n not in c_layers]",
                "names = list(c_layers) or list(s_layers)",
            ),
        ),
        ORACLE,
        fast=True,
    ),
    Mutant(
        "restore-keeps-generation",
        "lorarar_kernels/target_state.py",
        (  # TargetState._forget, the end of every restore
            (
                "self.layers, self.current, self.writing, self.generation = {}, None, None, self.generation + 1",
                "self.layers, self.current, self.writing, self.generation = {}, None, None, self.generation",
            ),
        ),
        ORACLE,
        fast=True,
    ),
    Mutant(
        "hyper-parts-hard-coded",
        "lorarar_kernels/rule.py",
        (
            (
                "    parts = resolve_parts(hypernet, hyper_parts)\n",
                "    parts = ('to_q', 'to_out.0') if hypernet is not None else ()\n",
            ),
        ),
        ORACLE,
        fast=True,
    ),
    Mutant(
        "weight-dtype-unchecked",
        "lorarar_kernels/merge.py",
        (("    if w.dtype not in WEIGHT_DTYPES:", "    if False:"),),
        ORACLE,  # check_job refuses fp64 too, but with another message: the test names the layer and dtype
    ),
    Mutant(
        "weight-dtype-unchecked-everywhere",
        "lorarar_kernels/merge.py",
        (
            ("    if w.dtype not in WEIGHT_DTYPES:", "    if False:"),
            ("lorarar_kernels/ops/validate.py", "    if dst.dtype not in WEIGHT_DTYPES:", "    if False:"),
        ),
        ORACLE,
        fast=True,
    ),
    Mutant(
        "weight-contiguity-unchecked",
        "lorarar_kernels/merge.py",
        (("    if not w.is_contiguous():", "    if False:"),),
        ORACLE,
        fast=True,
    ),
    Mutant(
        "demo-verify-trusts-itself",
        "python_api/lorarar/demo.py",
        (
            (
                "res.restore_bit_exact = all(torch.equal(v, unet_state(model)[k]) for k, v in original.items())",
                "res.restore_bit_exact = True",
            ),
            ('step("restore", swapper.reset,', 'step("restore", lambda: None,'),
        ),
        ("tests/test_cli.py::test_demo_writes_images_and_table",),
    ),  # ~1 min: full run only
    Mutant(
        "w1-halves-swapped",
        "lorarar_kernels/hypernet.py",
        (
            (
                "w1 = inp.weight.float()[:, side * width : (side + 1) * width]",
                "w1 = inp.weight.float()[:, (1 - side) * width : (2 - side) * width]",
            ),
        ),
        ORACLE,
        fast=True,
    ),
    Mutant(
        "lora-scale-dropped-from-p",
        "lorarar_kernels/hypernet.py",
        (("p = (w1 @ up).mul_(layer.scale)", "p = w1 @ up"),),
        ORACLE,
        fast=True,
    ),
    Mutant(
        "relu-removed",
        "lorarar_kernels/hypernet.py",
        (
            (
                "h_t = torch.addmm(inp.bias.float(), down.T, p_t).relu_()",
                "h_t = torch.addmm(inp.bias.float(), down.T, p_t)",
            ),
        ),
        ORACLE,
        fast=True,
    ),
    Mutant(
        "b1-dropped",
        "lorarar_kernels/hypernet.py",
        (("h_t = torch.addmm(inp.bias.float(), down.T, p_t)", "h_t = torch.mm(down.T, p_t)"),),
        ORACLE,
    ),
    Mutant(
        "old-only-layers-not-restored",
        "lorarar_kernels/target_state.py",
        (("_restore_layer(old_layers[name])", "old_layers[name]"),),  # TargetState.commit, swap._old_only
        ORACLE,
        fast=True,
    ),
    # ---- swap state
    Mutant(
        "commit-ignores-generation",
        "lorarar_kernels/target_state.py",
        (
            (
                "            if self.generation != swap._generation:\n                raise StaleSwapError(\n"
                '                    "this prepared swap is stale: the target was merged, restored or prepared again since"',
                "            if False:\n                raise StaleSwapError(\n"
                '                    "this prepared swap is stale: the target was merged, restored or prepared again since"',
            ),
        ),
        ENGINE,
    ),
    Mutant(
        "lease-keeps-generation",
        "lorarar_kernels/target_state.py",
        (
            (
                "        self.generation += 1\n        self.workspaces[slot].leased_at",
                "        self.workspaces[slot].leased_at",
            ),
        ),
        ENGINE,
    ),
    Mutant(
        "lease-same-slot",
        "lorarar_kernels/target_state.py",
        (("slot = 1 if self.current is not None and self.current._slot == 0 else 0", "slot = 0"),),
        ENGINE,
    ),
    Mutant(
        "snapshot-not-taken",
        "lorarar_kernels/target_state.py",
        (("layer.snapshot.copy_(layer.param.detach(), non_blocking=True)\n", "pass\n"),),
        ENGINE,
    ),
    Mutant(
        "restore-skips-last-layer",
        "lorarar_kernels/target_state.py",
        (
            (  # TargetState.restore
                "                for layer in writing.values():\n                    started = True\n                    _restore_layer(layer)",
                "                for layer in list(writing.values())[:-1]:\n                    started = True\n                    _restore_layer(layer)",
            ),
        ),
        ENGINE,
    ),
    Mutant(
        "untouched-not-checked",
        "lorarar_kernels/target_state.py",
        (
            (
                "            if version != layer.stamp[0] or moved:",
                "            if False:",
            ),
        ),
        ("tests/test_merge_errors.py", "tests/test_merge_in_place.py"),
    ),
    Mutant(
        "host-mode-not-reloaded",
        "lorarar_kernels/target_state.py",
        (("                    layer.param.detach().copy_(layer.snapshot, non_blocking=True)\n", ""),),
        ENGINE,
    ),
    Mutant(
        "replaced-parameter-accepted",
        "lorarar_kernels/merge.py",
        (("    if known is not None and known.param is not w:", "    if False:"),),
        ("tests/test_merge_errors.py", "tests/test_merge_in_place.py"),
        accepted="equivalent: TargetState.check_untouched refuses a replaced Parameter first, naming the layer "
        "and changing nothing (tests/test_merge_errors.py::test_replaced_parameter_is_refused_at_merge passes "
        "with and without this check); it is a second guard",
    ),
    Mutant(
        "several-devices-accepted",
        "lorarar_kernels/merge.py",
        (("        if len(devices) > 1:", "        if False:"),),
        ORACLE,
        accepted="on a CPU-only machine the only second device is meta, which the meta-weight check refuses "
        "before this one; it is caught only where a GPU gives a second real device",
    ),
    # ---- the rule and the materialiser
    Mutant(
        "sum-layers-take-hypernet",
        "lorarar_kernels/rule.py",
        (('        elif name == p or name.endswith("." + p):', "        elif True:"),),
        ENGINE,
    ),
    Mutant(
        "given-coefficients-ignored",
        "lorarar_kernels/materialise.py",
        (("            if r.given is not None:", "            if False:"),),
        ENGINE + ("tests/test_plan.py",),
    ),
    Mutant(
        "given-m-s-dropped",
        "lorarar_kernels/materialise.py",
        (
            (
                "torch.stack([r.given[0].to(device), r.given[1].to(device)])",
                "torch.stack([r.given[0].to(device), r.given[0].to(device)])",
            ),
        ),
        ENGINE + ("tests/test_plan.py",),
    ),
    Mutant(
        "split-is-style-rank",
        "lorarar_kernels/materialise.py",
        (("r.content.rank if r.content is not None else 0", "r.ref.rank"),),
        ENGINE,
    ),
    Mutant(
        "non-finite-unchecked",
        "lorarar_kernels/materialise.py",
        (("    if bad:\n        r = layers[min(bad)]", "    if False:\n        r = layers[min(bad)]"),),
        ("tests/test_plan.py", "tests/test_merge_errors.py"),
    ),
    Mutant(
        "coefficients-not-float32",
        "lorarar_kernels/rule.py",
        (("out.append(m.detach().to(dtype=torch.float32))", "out.append(m.detach())"),),
        ENGINE + ("tests/test_plan.py",),
    ),
    # ---- packing and the reference backend
    Mutant(
        "pack-scale-dropped",
        "lorarar_kernels/ops/__init__.py",
        (("            torch.mul(self.up, self.scale, out=up)", "            up.copy_(self.up)"),),
        ENGINE + ("tests/test_plan.py",),
    ),
    Mutant(
        "reference-col-scale-rows-swapped",
        "lorarar_kernels/ops/__init__.py",
        (
            (
                "    if job.col_scale is None:\n        return job.down",
                "    if job.col_scale is None:\n        return job.down\n"
                "    job = ApplyJob(job.name, job.dst, job.src, job.up, job.down, job.col_scale.flip(0), job.split)",
            ),
        ),
        ENGINE,
    ),
    # ---- the CPU kernels (C++; rebuilt in the scratch copy)
    Mutant(
        "cpp-bf16-ties-away",
        "csrc/cpu_convert.h",  # the scalar conversion: the portable path, which runs on every x86-64 CPU
        (("(u + 0x7FFFu + ((u >> 16) & 1u)) >> 16", "(u + 0x8000u) >> 16"),),
        TIES[:1],
        fast=True,
    ),
    Mutant(
        "cpp-avx512-bf16-ties-away",
        # the vector bf16 write-back of the AVX-512 and AMX paths (the one bf16 weights take on AVX-512 CPUs)
        "csrc/cpu_avx512_io.h",
        (("_mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))", "_mm512_set1_epi32(0x8000)"),),
        TIES[:1],
        fast=True,
        cpu_path="avx512",
    ),
    Mutant(
        "cpp-bf16-truncates",
        "csrc/cpu_convert.h",
        (("(u + 0x7FFFu + ((u >> 16) & 1u)) >> 16", "u >> 16"),),
        TIES,
    ),
    Mutant(
        "cpp-half-ties-away",
        "csrc/cpu_convert.h",
        (("if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;", "if (rest >= 0x1000u) ++h;"),),
        TIES,
    ),
    Mutant(
        "cpp-half-truncates",
        "csrc/cpu_convert.h",
        (("if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;", ""),),
        TIES,
    ),
    Mutant(
        "cpp-half-vector-truncates",
        "csrc/cpu_avx512_io.h",
        (  # store_n: the AVX-512 masked fp16 write-back (what `auto` runs for fp16 on an AVX-512/AMX CPU; the
            # ties test's 24 x 40 output is not 64-byte-strided, so it never takes the streaming stream32)
            (
                "_mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));",
                "_mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC));",
            ),
        ),
        TIES,
        cpu_path="avx512",
    ),
    Mutant(
        "cpp-col-scale-wrong-row",
        "csrc/cpu_blocking.h",
        (  # down_row: shared by every path (AVX-512 for fp32/fp16 and AMX's pack_down_pairs for bf16 here)
            (
                "scale + (k < job.split ? 0 : job.ld_col_scale) + c0",
                "scale + (k <= job.split ? 0 : job.ld_col_scale) + c0",
            ),
        ),
        NATIVE,
    ),
    Mutant(
        "cpp-col-scale-ignored",
        "csrc/cpu_blocking.h",
        (  # pack_down, whole NR strips: the fp32-FMA paths (AVX-512 for fp32/fp16 here; bf16 runs on AMX's own
            # pack_down_pairs here, so bf16 cases do not see this mutant)
            (
                "          for (int j = 0; j < NR; ++j) out[j] = drow[t + j] * srow[t + j];",
                "          for (int j = 0; j < NR; ++j) out[j] = drow[t + j];",
            ),
        ),
        NATIVE,
    ),
    Mutant(
        "cpp-edge-col-scale-ignored",
        "csrc/cpu_blocking.h",
        (  # pack_down, the last partial strip (columns not a multiple of NR = 32 on AVX-512): fp32/fp16 here
            (
                "out[j] = j < n ? (srow ? drow[t + j] * srow[t + j] : drow[t + j]) : 0.0f;",
                "out[j] = j < n ? drow[t + j] : 0.0f;",
            ),
        ),
        NATIVE,
    ),
    Mutant(
        "cpp-last-rank-term-dropped",
        "csrc/cpu_apply_avx512.cpp",
        (  # tile_12x32, the AVX-512 register tile (fp32/fp16 here; bf16 runs on AMX)
            (
                "  for (int64_t k = 0; k < K; ++k) {\n    const __m512 b0",
                "  for (int64_t k = 0; k + 1 < K; ++k) {\n    const __m512 b0",
            ),
        ),
        NATIVE,
        cpu_path="avx512",
    ),
    Mutant(
        "cpp-src-not-added",
        "csrc/cpu_apply_avx512.cpp",
        (  # Avx512Tile::run, the masked write-back (in-place merges, edges, unaligned outputs; fp32/fp16 here):
            # the first 16 columns get the source of the next 16 (zeros past the edge) instead of their own
            (
                "      const __m512 lo = _mm512_add_ps(load_n<DT>(s, m0), acc[2 * i]);",
                "      const __m512 lo = _mm512_add_ps(load_n<DT>(s + 16 * es, m1), acc[2 * i]);",
            ),
        ),
        NATIVE,
        cpu_path="avx512",
    ),
    Mutant(
        "cpp-pack-scale-dropped",
        "csrc/cpu_pack.cpp",
        (("    if constexpr (SCALED) v *= scale;\n", "\n"),),
        NATIVE,
        every=True,
    ),
    Mutant(
        "cpp-pack-finite-unchecked",
        "csrc/cpu_pack.cpp",
        (
            (
                "      bad |= convert_row_any<true>(job.dtype_up, src, dst, job.rank, scale);",
                "      convert_row_any<true>(job.dtype_up, src, dst, job.rank, scale);",
            ),
        ),
        ("tests/test_ops_pack.py", "tests/test_plan.py", "tests/test_merge_errors.py"),
    ),
)
