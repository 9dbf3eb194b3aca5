// Which CPU kernel paths this binary holds and this CPU runs, read from cpuid and XGETBV at run time.
//
// avx2   = AVX2 + FMA + F16C (x86-64-v3) with the OS saving ymm state (XCR0 bits 1-2);
// avx512 = avx2 + AVX-512 F/BW/VL with the OS saving zmm/opmask state (XCR0 bits 5-7);
// amx    = avx512 + AMX-TILE + AMX-BF16, the OS saving tile state (XCR0 bits 17-18) and, on Linux, this
//          process granted the tile data permission (arch_prctl ARCH_REQ_XCOMP_PERM, asked once here).
// This file is compiled without any instruction-set flag, so it runs on every x86-64.
#include "cpu_isa.h"

#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define LORARAR_X86 1
#endif
#if defined(__linux__) && defined(LORARAR_X86)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lorarar {
namespace {

struct Features {
  bool avx2 = false, avx512 = false, amx_cpu = false, amx_os = false;
  std::string model;
};

#ifdef LORARAR_X86
uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

bool request_amx_permission() {
#ifdef __linux__
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureTileData = 18;
  unsigned long bits = 0;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureTileData) != 0) return false;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bits) != 0) return false;
  return (bits >> kXfeatureTileData) & 1;
#else
  return true;
#endif
}
#endif

Features detect() {
  Features f;
#ifdef LORARAR_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  const uint64_t x = osxsave ? xcr0() : 0;
  unsigned b7 = 0, c7 = 0, d7 = 0;
  if (__get_cpuid_count(7, 0, &a, &b7, &c7, &d7)) {
    const CpuFeatures w = cpu_features_from(c, b7, d7, x);
    f.avx2 = w.avx2;
    f.avx512 = w.avx512;
    f.amx_cpu = w.amx_cpu;
    f.amx_os = w.amx_cpu && w.amx_tiles_os && request_amx_permission();
  }
  unsigned brand[12];
  if (__get_cpuid(0x80000000, &a, &b, &c, &d) && a >= 0x80000004) {
    for (unsigned i = 0; i < 3; ++i) {
      __get_cpuid(0x80000002 + i, &brand[4 * i], &brand[4 * i + 1], &brand[4 * i + 2], &brand[4 * i + 3]);
    }
    char s[49];
    std::memcpy(s, brand, 48);
    s[48] = '\0';
    f.model = s;
    const size_t first = f.model.find_first_not_of(' '), last = f.model.find_last_not_of(' ');
    f.model = first == std::string::npos ? "" : f.model.substr(first, last - first + 1);
  }
#endif
  return f;
}

const Features& features() {
  static const Features f = detect();  // thread-safe, once per process
  return f;
}

}  // namespace

CpuFeatures cpu_features_from(uint32_t ecx1, uint32_t ebx7, uint32_t edx7, uint64_t xcr0_bits) {
  const bool fma = ecx1 & (1u << 12), osxsave = ecx1 & (1u << 27), avx = ecx1 & (1u << 28),
             f16c = ecx1 & (1u << 29);
  const uint64_t x = osxsave ? xcr0_bits : 0;
  const bool ymm = (x & 0x6) == 0x6, zmm = (x & 0xE6) == 0xE6, tiles = (x & 0x60000) == 0x60000;
  CpuFeatures f;
  f.avx2 = avx && fma && f16c && (ebx7 & (1u << 5)) && ymm;
  f.avx512 = f.avx2 && (ebx7 & (1u << 16)) && (ebx7 & (1u << 30)) && (ebx7 & (1u << 31)) && zmm;
  f.amx_cpu = f.avx512 && (edx7 & (1u << 24)) && (edx7 & (1u << 22));
  f.amx_tiles_os = tiles;
  return f;
}

const char* cpu_path_name(int path) {
  switch (path) {
    case kPathPortable: return "portable";
    case kPathAvx2: return "avx2";
    case kPathAvx512: return "avx512";
    case kPathAmx: return "amx";
    default: return "unknown";
  }
}

std::string cpu_path_unsupported(int path) {
  const Features& f = features();
  switch (path) {
    case kPathPortable: return "";
    case kPathAvx2:
#ifndef LORARAR_HAVE_AVX2
      return "this build has no AVX2 path (not x86-64, or LORARAR_CPU_ISA=portable)";
#endif
      return f.avx2 ? "" : "this CPU (or OS) lacks AVX2, FMA or F16C";
    case kPathAvx512:
#ifndef LORARAR_HAVE_AVX512
      return "this build has no AVX-512 path (not x86-64, or LORARAR_CPU_ISA=portable)";
#endif
      return f.avx512 ? "" : "this CPU (or OS) lacks AVX-512 F/BW/VL";
    case kPathAmx:
#ifndef LORARAR_HAVE_AMX
      return "this build has no AMX path (compiler without -mamx-bf16, or LORARAR_CPU_ISA=portable)";
#endif
      if (!f.amx_cpu) return "this CPU lacks AMX-TILE/AMX-BF16 (or AVX-512 F/BW/VL)";
      return f.amx_os ? "" : "the OS does not let this process use AMX tile data (XCR0 / arch_prctl)";
    default: return "unknown CPU path code " + std::to_string(path);
  }
}

int cpu_best_path() {
  for (int p = kNumPaths - 1; p > kPathPortable; --p) {
    if (cpu_path_unsupported(p).empty()) return p;
  }
  return kPathPortable;
}

std::string cpu_model() { return features().model; }

}  // namespace lorarar
