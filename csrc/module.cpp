// lorarar_kernels._C: the pybind11 surface of the native kernels. Raw addresses and sizes in, no libtorch.
//
// Every entry validates its job table before anything is written (std::invalid_argument -> ValueError,
// which native.py turns into a LoraRarError naming the layer); the kernels then trust the table.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_apply.h"
#include "cpu_isa.h"
#include "cpu_pack.h"
#include "cuda_api.h"
#include "job_table.h"

#ifndef LORARAR_BUILD_CUDA_MODE  // set by CMakeLists.txt
#define LORARAR_BUILD_CUDA_MODE "unknown"
#endif
#ifndef LORARAR_BUILD_NVCC
#define LORARAR_BUILD_NVCC ""
#endif

namespace py = pybind11;
using lorarar::CoeffJob;
using lorarar::Job;
using lorarar::PackJob;

namespace {

int64_t element_size(int64_t dtype) { return dtype == lorarar::kFloat32 ? 4 : 2; }

// Byte range [first, last) spanned by a [rows, cols] matrix with row stride ld.
struct Span {
  int64_t first, last;
};
Span span(int64_t addr, int64_t rows, int64_t cols, int64_t ld, int64_t es) {
  return {addr, addr + ((rows - 1) * ld + cols) * es};
}
bool overlap(Span a, Span b) { return a.first < b.last && b.first < a.last; }

// Validates one Job row; every failure names the Job field (csrc/job_table.h) that is wrong.
void check_job(const Job& j, int64_t i) {
  auto fail = [i](const std::string& field, const std::string& what) {
    throw std::invalid_argument("job " + std::to_string(i) + ": " + field + ": " + what);
  };
  auto str = [](int64_t v) { return std::to_string(v); };
  if (j.dtype < 0 || j.dtype > 2) {
    fail("dtype", "code " + str(j.dtype) + " is not 0 (float32), 1 (float16) or 2 (bfloat16)");
  }
  if (j.rows < 1) fail("rows", "empty weight [" + str(j.rows) + ", " + str(j.cols) + "]");
  if (j.cols < 1) fail("cols", "empty weight [" + str(j.rows) + ", " + str(j.cols) + "]");
  if (j.rank < 0) fail("rank", str(j.rank) + " is negative");
  if (j.split < 0 || j.split > j.rank) {
    fail("split", str(j.split) + " is outside [0, rank " + str(j.rank) + "]");
  }
  if (j.sources != 0 && j.sources != 1) fail("sources", "must be 0 (packed factors) or 1 (the LoRAs' own)");
  auto short_row = [&](int64_t ld, int64_t width) {
    return "row stride " + str(ld) + " is shorter than its row of " + str(width);
  };
  if (j.ld_dst < j.cols) fail("ld_dst", short_row(j.ld_dst, j.cols));
  if (j.ld_src < j.cols) fail("ld_src", short_row(j.ld_src, j.cols));
  if (j.col_scale != 0 && j.ld_col_scale < j.cols) fail("ld_col_scale", short_row(j.ld_col_scale, j.cols));
  if (j.dst == 0) fail("dst", "null address");
  if (j.src == 0) fail("src", "null address");
  const int64_t es = element_size(j.dtype);
  if (j.dst % es) fail("dst", "misaligned address");
  if (j.src % es) fail("src", "misaligned address");
  if (j.col_scale % 4) fail("col_scale", "misaligned address");
  const Span dst = span(j.dst, j.rows, j.cols, j.ld_dst, es);
  if (j.src == j.dst) {
    if (j.ld_src != j.ld_dst) fail("ld_src", "in place with a row stride other than ld_dst");
  } else if (overlap(dst, span(j.src, j.rows, j.cols, j.ld_src, es))) {
    fail("src", "overlaps dst without being the same matrix");
  }
  if (j.col_scale != 0 && overlap(dst, span(j.col_scale, 2, j.cols, j.ld_col_scale, 4))) {
    fail("col_scale", "overlaps dst");
  }
  // The factors: one fp32 block (packed) or two LoRAs' blocks of ranks split and rank - split.
  struct Factor {
    const char *up_name, *down_name, *ld_up_name, *ld_down_name, *dtype_name;
    int64_t up, down, ld_up, ld_down, dt_up, dt_down, rank;
  };
  std::vector<Factor> factors;
  if (j.sources == 0) {
    factors.push_back({"up", "down", "ld_up", "ld_down", "dtype", j.up, j.down, j.ld_up, j.ld_down,
                       lorarar::kFloat32, lorarar::kFloat32, j.rank});
  } else {
    factors.push_back({"up", "down", "ld_up", "ld_down", "dtypes", j.up, j.down, j.ld_up, j.ld_down,
                       j.dtypes & 15, (j.dtypes >> 4) & 15, j.split});
    factors.push_back({"up2", "down2", "ld_up2", "ld_down2", "dtypes", j.up2, j.down2, j.ld_up2, j.ld_down2,
                       (j.dtypes >> 8) & 15, (j.dtypes >> 12) & 15, j.rank - j.split});
  }
  for (const Factor& f : factors) {
    if (f.rank == 0) continue;
    if (f.dt_up > 2 || f.dt_down > 2) fail(f.dtype_name, "factor dtype code is not 0, 1 or 2");
    if (f.up == 0) fail(f.up_name, "null address");
    if (f.down == 0) fail(f.down_name, "null address");
    if (f.ld_up < f.rank) fail(f.ld_up_name, short_row(f.ld_up, f.rank));
    if (f.ld_down < j.cols) fail(f.ld_down_name, short_row(f.ld_down, j.cols));
    const int64_t eu = element_size(f.dt_up), ed = element_size(f.dt_down);
    if (f.up % eu) fail(f.up_name, "misaligned address");
    if (f.down % ed) fail(f.down_name, "misaligned address");
    if (overlap(dst, span(f.up, j.rows, f.rank, f.ld_up, eu))) fail(f.up_name, "overlaps dst");
    if (overlap(dst, span(f.down, f.rank, j.cols, f.ld_down, ed))) fail(f.down_name, "overlaps dst");
  }
}

void check_coeff_job(const CoeffJob& j, int64_t i, int64_t hidden) {
  auto fail = [i](const std::string& what) {
    throw std::invalid_argument("coefficient job " + std::to_string(i) + ": " + what);
  };
  if (j.cols < 1 || j.rank < 1) fail("empty layer");
  if (j.p == 0 || j.a == 0 || j.out == 0) fail("null address");
  if (j.p % 4 || j.a % 4 || j.out % 4) fail("misaligned address");
  if (j.ld_p < j.rank || j.ld_a < j.cols || j.ld_out < j.cols) fail("a row stride is shorter than its row");
  const Span out = span(j.out, 2, j.cols, j.ld_out, 4);
  if (overlap(out, span(j.p, hidden, j.rank, j.ld_p, 4)) ||
      overlap(out, span(j.a, j.rank, j.cols, j.ld_a, 4))) {
    fail("out overlaps an input");
  }
}

// A [rows, cols] matrix at byte address addr, row stride ld elements of es bytes.
struct Mat {
  int64_t addr, rows, cols, ld, es;
  Span bytes() const { return span(addr, rows, cols, ld, es); }
};

// Whether two matrices share a byte. Exact for the same row stride and element size (columns side by side
// in one buffer, as a plan's [B_c | B_s] are), conservative (their byte ranges) otherwise.
bool mats_overlap(Mat x, Mat y) {
  if (!overlap(x.bytes(), y.bytes())) return false;
  if (x.ld != y.ld || x.es != y.es || (x.addr - y.addr) % x.es) return true;
  if (x.addr > y.addr) std::swap(x, y);
  const int64_t d = (y.addr - x.addr) / x.es, q = d / x.ld, rem = d % x.ld;
  // y's row i lies in x's row q + i at columns [rem, rem + y.cols), wrapping into row q + i + 1 past ld.
  if (q < x.rows && rem < x.cols) return true;
  return rem + y.cols > x.ld && q + 1 < x.rows;
}

// Validates a pack table: sizes, strides, alignment, and that no job writes where any job reads or
// another job writes (jobs run in parallel).
void check_pack_jobs(const PackJob* jobs, int64_t n) {
  struct Entry {
    Mat m;
    int64_t job;
    bool written;
  };
  std::vector<Entry> all;
  for (int64_t i = 0; i < n; ++i) {
    const PackJob& j = jobs[i];
    auto fail = [i](const std::string& what) {
      throw std::invalid_argument("pack job " + std::to_string(i) + ": " + what);
    };
    for (int64_t code : {j.dtype_up, j.dtype_down}) {
      if (code < 0 || code > 2) fail("dtype code " + std::to_string(code) + " is not 0, 1 or 2");
    }
    if (j.rows < 1 || j.cols < 1 || j.rank < 1) fail("empty factor");
    const bool check_only = j.up_dst == 0 && j.down_dst == 0;
    if (j.up_src == 0 || j.down_src == 0 || (!check_only && (j.up_dst == 0 || j.down_dst == 0))) {
      fail("null address");
    }
    if (j.ld_up_src < j.rank || j.ld_down_src < j.cols ||
        (!check_only && (j.ld_up_dst < j.rank || j.ld_down_dst < j.cols))) {
      fail("a row stride is shorter than its row");
    }
    const int64_t eu = element_size(j.dtype_up), ed = element_size(j.dtype_down);
    if (j.up_src % eu || j.down_src % ed || j.up_dst % 4 || j.down_dst % 4) fail("misaligned address");
    if (!check_only) {
      all.push_back({{j.up_dst, j.rows, j.rank, j.ld_up_dst, 4}, i, true});
      all.push_back({{j.down_dst, j.rank, j.cols, j.ld_down_dst, 4}, i, true});
    }
    all.push_back({{j.up_src, j.rows, j.rank, j.ld_up_src, eu}, i, false});
    all.push_back({{j.down_src, j.rank, j.cols, j.ld_down_src, ed}, i, false});
  }
  // Sweep in address order: each matrix meets only those starting before its byte range ends.
  std::sort(all.begin(), all.end(), [](const Entry& a, const Entry& b) { return a.m.addr < b.m.addr; });
  for (size_t a = 0; a < all.size(); ++a) {
    const int64_t last = all[a].m.bytes().last;
    for (size_t b = a + 1; b < all.size() && all[b].m.addr < last; ++b) {
      if ((all[a].written || all[b].written) && mats_overlap(all[a].m, all[b].m)) {
        const Entry& w = all[a].written ? all[a] : all[b];
        const Entry& o = all[a].written ? all[b] : all[a];
        throw std::invalid_argument("pack job " + std::to_string(w.job) + ": its destination overlaps " +
                                    (o.written ? "the destination" : "a source") + " of pack job " +
                                    std::to_string(o.job));
      }
    }
  }
}

template <typename Row>
std::vector<Row> rows_of(const py::bytes& table) {
  const std::string raw = table;
  if (raw.size() % sizeof(Row) != 0) {
    throw std::invalid_argument("job table size is not a whole number of rows");
  }
  std::vector<Row> rows(raw.size() / sizeof(Row));
  if (!rows.empty()) std::memcpy(rows.data(), raw.data(), raw.size());
  return rows;
}

// Appends the tile -> layer map (int32) after the rows and returns (blob, total tiles).
template <typename Row>
py::tuple finish_plan(std::vector<Row>& rows, const std::vector<int64_t>& tiles_per_row) {
  int64_t total = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i].tile_start = total;
    total += tiles_per_row[i];
  }
  if (total >= (int64_t{1} << 31)) throw std::invalid_argument("too many tiles for one launch");
  std::string blob(rows.size() * sizeof(Row) + static_cast<size_t>(total) * sizeof(int32_t), '\0');
  if (!rows.empty()) std::memcpy(blob.data(), rows.data(), rows.size() * sizeof(Row));
  auto* map = reinterpret_cast<int32_t*>(blob.data() + rows.size() * sizeof(Row));
  for (size_t i = 0; i < rows.size(); ++i) {
    for (int64_t t = 0; t < tiles_per_row[i]; ++t) *map++ = static_cast<int32_t>(i);
  }
  return py::make_tuple(py::bytes(blob), total);
}

py::tuple plan_apply(const py::bytes& table) {
  std::vector<Job> rows = rows_of<Job>(table);
  std::vector<int64_t> tiles;
  for (size_t i = 0; i < rows.size(); ++i) {
    check_job(rows[i], static_cast<int64_t>(i));
    if (rows[i].dtype != rows[0].dtype) throw std::invalid_argument("one CUDA launch takes one weight dtype");
    if (rows[i].sources) throw std::invalid_argument("the CUDA kernels take packed fp32 factors (sources = 0)");
    tiles.push_back(((rows[i].rows + lorarar::kCudaTileRows - 1) / lorarar::kCudaTileRows) *
                    ((rows[i].cols + lorarar::kCudaTileCols - 1) / lorarar::kCudaTileCols));
  }
  return finish_plan(rows, tiles);
}

py::tuple plan_coefficients(const py::bytes& table, int64_t hidden) {
  if (hidden < 1 || hidden > lorarar::kCoeffMaxHidden) {
    throw std::invalid_argument("hidden width " + std::to_string(hidden) + " is not in [1, 256]");
  }
  std::vector<CoeffJob> rows = rows_of<CoeffJob>(table);
  std::vector<int64_t> tiles;
  for (size_t i = 0; i < rows.size(); ++i) {
    check_coeff_job(rows[i], static_cast<int64_t>(i), hidden);
    tiles.push_back((rows[i].cols + lorarar::kCoeffTileCols - 1) / lorarar::kCoeffTileCols);
  }
  return finish_plan(rows, tiles);
}

// The pack kernel (cpu_pack.cpp) is compiled for x86-64-v3 where the build has the AVX2 path.
std::optional<std::string> cpu_unsupported() {
  const std::string why = lorarar::cpu_path_unsupported(lorarar::kPathAvx2);
  if (why.empty() || why.rfind("this build has no", 0) == 0) return std::nullopt;  // portable build: scalar
  return "the pack kernel needs AVX2/FMA/F16C: " + why;
}

// path: a cpu_isa.h code, -1 for the best one here. Returns the first job that wrote a non-finite value
// (-1: none).
int64_t cpu_apply(int64_t table, int64_t n_jobs, int n_threads, int path) {
  if (n_jobs < 0 || (n_jobs > 0 && table == 0)) throw std::invalid_argument("bad job table");
  if (path < -1 || path >= lorarar::kNumPaths) throw std::invalid_argument("bad CPU path code");
  if (path >= 0 && !lorarar::cpu_path_unsupported(path).empty()) {
    throw std::runtime_error(std::string("CPU path ") + lorarar::cpu_path_name(path) + ": " +
                             lorarar::cpu_path_unsupported(path));
  }
  const Job* jobs = reinterpret_cast<const Job*>(table);
  for (int64_t i = 0; i < n_jobs; ++i) check_job(jobs[i], i);
  py::gil_scoped_release release;
  return lorarar::cpu_apply(jobs, n_jobs, n_threads, path);
}

// {path name: None if it runs here, else why not}, slowest first.
py::dict cpu_paths() {
  py::dict out;
  for (int p = 0; p < lorarar::kNumPaths; ++p) {
    const std::string why = lorarar::cpu_path_unsupported(p);
    out[lorarar::cpu_path_name(p)] = why.empty() ? py::object(py::none()) : py::object(py::str(why));
  }
  return out;
}

// Returns one byte per job: 1 when every value it wrote is finite.
py::bytes cpu_pack(int64_t table, int64_t n_jobs, int n_threads) {
  if (n_jobs < 0 || (n_jobs > 0 && table == 0)) throw std::invalid_argument("bad pack table");
  if (auto why = cpu_unsupported()) throw std::runtime_error(*why);
  const PackJob* jobs = reinterpret_cast<const PackJob*>(table);
  check_pack_jobs(jobs, n_jobs);
  std::string finite(static_cast<size_t>(n_jobs), '\0');
  {
    py::gil_scoped_release release;
    lorarar::cpu_pack(jobs, n_jobs, n_threads, reinterpret_cast<uint8_t*>(finite.data()));
  }
  return py::bytes(finite);
}

#ifdef LORARAR_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

std::optional<std::string> cuda_unavailable(int device) {
#ifdef LORARAR_WITH_CUDA
  std::string why = lorarar::cuda_unavailable(device);
  if (why.empty()) return std::nullopt;
  return why;
#else
  (void)device;
  return std::string("lorarar_kernels._C was built without CUDA (nvcc not found or LORARAR_CUDA=0)");
#endif
}

void require_cuda() {
  if (!kWithCuda) throw std::runtime_error("lorarar_kernels._C was built without CUDA");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorarar native kernels: the CPU (OpenMP, AVX2) and CUDA passes over the weights";
  std::vector<std::string> fields(std::begin(lorarar::kJobFields), std::end(lorarar::kJobFields));
  m.attr("JOB_FIELDS") = py::tuple(py::cast(fields));
  std::vector<std::string> cfields(std::begin(lorarar::kCoeffFields), std::end(lorarar::kCoeffFields));
  m.attr("COEFF_FIELDS") = py::tuple(py::cast(cfields));
  std::vector<std::string> pfields(std::begin(lorarar::kPackFields), std::end(lorarar::kPackFields));
  m.attr("PACK_FIELDS") = py::tuple(py::cast(pfields));
  m.attr("CUDA_TILE") = py::make_tuple(lorarar::kCudaTileRows, lorarar::kCudaTileCols);
  py::dict build;
  build["cuda_mode"] = LORARAR_BUILD_CUDA_MODE;  // LORARAR_CUDA at configure time: AUTO, ON or OFF
  build["nvcc"] = LORARAR_BUILD_NVCC;            // the CUDA compiler used, "" when none
  build["cpu_isa"] = "run-time dispatch: see cpu_paths()";
  m.attr("BUILD") = build;

  m.def("compiled_with_cuda", [] { return kWithCuda; }, "True when the CUDA kernels were compiled in.");
  m.def("cpu_isa", [] { return std::string(lorarar::cpu_path_name(lorarar::cpu_best_path())); },
        "The fastest CPU kernel path this binary runs on this CPU: 'amx', 'avx512', 'avx2' or 'portable'.");
  m.def("cpu_paths", &cpu_paths, "{CPU kernel path: None if it runs here, else why not}, slowest first.");
  m.def("cpu_model", &lorarar::cpu_model, "The CPU's brand string from cpuid ('' when unknown).");
  m.def(
      "cpu_features_from",
      [](uint32_t ecx1, uint32_t ebx7, uint32_t edx7, uint64_t xcr0) {
        const lorarar::CpuFeatures f = lorarar::cpu_features_from(ecx1, ebx7, edx7, xcr0);
        py::dict d;
        d["avx2"] = f.avx2;
        d["avx512"] = f.avx512;
        d["amx_cpu"] = f.amx_cpu;
        d["amx_tiles_os"] = f.amx_tiles_os;
        return d;
      },
      py::arg("ecx1"), py::arg("ebx7"), py::arg("edx7"), py::arg("xcr0"),
      "The feature rule of cpu_paths() from the registers alone: cpuid(1).ecx, cpuid(7,0).ebx/.edx, XCR0.");
  m.def("cpu_unsupported", &cpu_unsupported, "None when this CPU can run the pack kernel, else why not.");
  m.def("cpu_apply", &cpu_apply, py::arg("table"), py::arg("n_jobs"), py::arg("n_threads"),
        py::arg("path") = -1,
        "dst = round(fp32(src) + up @ (down * S)) for n_jobs Job rows at host address `table`; returns the "
        "index of the first job that wrote +-Inf or NaN (-1: none).");
  m.def("cpu_pack", &cpu_pack, py::arg("table"), py::arg("n_jobs"), py::arg("n_threads"),
        "Pack LoRA factors into fp32 swap factors (PackJob table at address `table`); one finite flag byte "
        "per job.");
  m.def("plan_apply", &plan_apply, py::arg("table"),
        "Validate Job rows (bytes) of one dtype; return (rows with tile_start + int32 tile map, tiles).");
  m.def("plan_coefficients", &plan_coefficients, py::arg("table"), py::arg("hidden"),
        "Validate CoeffJob rows (bytes); return (rows with tile_start + int32 tile map, tiles).");
  m.def("cuda_unavailable", &cuda_unavailable, py::arg("device"),
        "None when CUDA device `device` can run the compiled kernels, else why not.");
  m.def(
      "cuda_apply",
      [](int64_t table, int64_t n_jobs, int64_t tiles, int64_t dtype, int device, int64_t stream,
         int64_t first_bad) {
        require_cuda();
        if (dtype < 0 || dtype > 2) throw std::invalid_argument("bad dtype code");
        if (table == 0 || n_jobs < 1 || tiles < 1) throw std::invalid_argument("empty plan");
        if (first_bad == 0) throw std::invalid_argument("null non-finite flag");
#ifdef LORARAR_WITH_CUDA
        lorarar::cuda_apply(table, n_jobs, tiles, dtype, device, stream, first_bad);
#else
        (void)device, (void)stream;
#endif
      },
      py::arg("table"), py::arg("n_jobs"), py::arg("total_tiles"), py::arg("dtype"), py::arg("device"),
      py::arg("stream"), py::arg("first_bad"),
      "Grouped apply of a plan_apply plan (device copy) on `stream`; no sync, no alloc. `first_bad`: a "
      "device int32 the caller sets to INT32_MAX; the kernel lowers it to the first job that wrote +-Inf "
      "or NaN.");
  m.def(
      "cuda_coefficients",
      [](int64_t table, int64_t n_jobs, int64_t tiles, int64_t hidden, int64_t b1, int64_t w2, int64_t b2,
         int device, int64_t stream) {
        require_cuda();
        if (table == 0 || n_jobs < 1 || tiles < 1) throw std::invalid_argument("empty plan");
        if (hidden < 1 || hidden > lorarar::kCoeffMaxHidden) throw std::invalid_argument("bad hidden width");
        if (b1 == 0 || w2 == 0 || b2 == 0 || b1 % 4 || w2 % 4 || b2 % 4) {
          throw std::invalid_argument("null or misaligned head address");
        }
#ifdef LORARAR_WITH_CUDA
        lorarar::cuda_coefficients(table, n_jobs, tiles, hidden, b1, w2, b2, device, stream);
#else
        (void)device, (void)stream;
#endif
      },
      py::arg("table"), py::arg("n_jobs"), py::arg("total_tiles"), py::arg("hidden"), py::arg("b1"),
      py::arg("w2"), py::arg("b2"), py::arg("device"), py::arg("stream"),
      "out = b2 + W2 relu(P A + b1) for every CoeffJob of a device plan from plan_coefficients.");
}
