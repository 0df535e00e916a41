// Per-feature pairs of sums in one read, as XLA FFI handlers for the CPU.
//
// XLA:CPU gives each reduction its own pass over memory, so the two sums a
// batch norm needs (sum(x) and sum(x^2) forward; sum(g) and
// sum(g * (x - mean)) backward) read their arrays twice. These handlers
// read them once. jaxbn/_native.py builds this file and describes the
// operands: `a` and `b` hold (outer, features, inner) arrays in row-major
// order, flat (a flat operand has one layout: XLA never copies it into
// another), float32 or bfloat16, reduced over `outer` and `inner` (inner = 1:
// features last, as NHWC; outer = 1: features first, as a layer norm's
// rows); `shift_a`, `shift_b` are float32, one per feature; the attribute
// `inner` gives the layout.
//
//   jaxbn_square_sums:  s1 = sum(a - shift_a), s2 = sum((a - shift_a)^2)
//   jaxbn_product_sums: s1 = sum(a - shift_a),
//                       s2 = sum((a - shift_a) * (b - shift_b))
//
// Accuracy and determinism: each float32 accumulator adds at most 64
// values before it is flushed into float64, and the flushes happen in an
// order fixed by the shape, so the result does not depend on the threads
// that ran it. jaxbn/_native.py compiles with -ffp-contract=off: every
// operation rounds as written, never fused into a multiply-add at the
// compiler's discretion, so each code path gives the same bits.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 64;          // values per float32 accumulator
constexpr int64_t kLanes = 16;          // accumulators along a contiguous run
constexpr int64_t kTile = 4 * kLanes;   // features a short row's accumulators hold
constexpr int64_t kTaskEntries = 1 << 17;  // entries a task claims, at least

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) {  // bfloat16
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Runs body(task) for task in [0, tasks) on the caller and the pool. The
// caller never waits for a task that has not started, so a busy (or
// absent) pool cannot stall it; `body` outlives this call in the shared
// state, as tasks may start after it has returned.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, Body body) {
  struct Work {
    explicit Work(Body body) : body(std::move(body)) {}
    Body body;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto work = std::make_shared<Work>(std::move(body));
  auto run = [work, tasks]() {
    for (int64_t k; (k = work->next.fetch_add(1)) < tasks;) {
      work->body(k);
      work->done.fetch_add(1);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(run)(run));
  run();
  while (work->done.load() < tasks) std::this_thread::yield();
}

// Runs sum_block(k, s1, s2) for each block k in [0, blocks) in parallel, each
// into float64 partials of its own, then adds the partials in block order.
template <typename SumBlock>
void SumBlocksInOrder(ffi::ThreadPool& pool, int64_t blocks, int64_t features,
                      SumBlock sum_block, float* out1, float* out2) {
  auto partial = std::make_shared<std::vector<double>>(blocks * 2 * features, 0.0);
  ParallelFor(pool, blocks, [=](int64_t k) {
    double* s = partial->data() + k * 2 * features;
    sum_block(k, s, s + features);
  });
  for (int64_t j = 0; j < features; ++j) {
    double t1 = 0, t2 = 0;
    for (int64_t k = 0; k < blocks; ++k) {
      t1 += (*partial)[k * 2 * features + j];
      t2 += (*partial)[k * 2 * features + features + j];
    }
    out1[j] = static_cast<float>(t1);
    out2[j] = static_cast<float>(t2);
  }
}

// 16 float32 lanes (GCC/Clang vector extensions: two AVX2 or one AVX-512
// register), so a contiguous run is summed lane-wise, not element by element.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint16_t Lanes16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t Lanes32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline Lanes LoadLanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline Lanes LoadLanes(const uint16_t* p) {  // bfloat16
  Lanes16 half;
  std::memcpy(&half, p, sizeof half);
  Lanes32 bits = __builtin_convertvector(half, Lanes32) << 16;
  Lanes v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Rows [begin, end) of a (rows, features) array into float64 sums s1, s2,
// through one float32 accumulator per feature in memory. Square sums read
// kGroupRows rows per accumulator load and store (the accumulators of a
// 16-lane column in registers meanwhile): a row at a time, those loads and
// stores, not memory, bounded the pass. Product sums read two arrays, and
// twice the rows at once measured slower for all but the widest rows.
// Either way each accumulator adds its rows in order.
template <typename A, typename B, bool kSquare>
void SumRowBlock(const A* a, const B* b, const float* shift_a, const float* shift_b,
                 int64_t begin, int64_t end, int64_t features, double* s1, double* s2) {
  constexpr int64_t kGroupRows = kSquare ? 8 : 1;
  std::vector<float> acc(2 * features);
  float* acc1 = acc.data();
  float* acc2 = acc1 + features;
  auto add_rows = [&](int64_t first, int64_t last, int64_t j) {  // rows [first, last), feature j
    for (int64_t r = first; r < last; ++r) {
      float u = Load(a, r * features + j) - shift_a[j];
      float v = kSquare ? u : Load(b, r * features + j) - shift_b[j];
      acc1[j] += u;
      acc2[j] += u * v;
    }
  };
  for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
    int64_t chunk_end = std::min(end, chunk + kChunk);
    std::fill(acc.begin(), acc.end(), 0.f);
    int64_t r = chunk;
    for (; kGroupRows > 1 && r + kGroupRows <= chunk_end; r += kGroupRows) {
      int64_t j = 0;
      for (; j + kLanes <= features; j += kLanes) {
        Lanes shift = LoadLanes(shift_a + j), sum1 = LoadLanes(acc1 + j),
              sum2 = LoadLanes(acc2 + j);
        for (int64_t q = r; q < r + kGroupRows; ++q) {
          Lanes u = LoadLanes(a + q * features + j) - shift;
          sum1 += u;
          sum2 += u * u;
        }
        std::memcpy(acc1 + j, &sum1, sizeof sum1);
        std::memcpy(acc2 + j, &sum2, sizeof sum2);
      }
      for (; j < features; ++j) add_rows(r, r + kGroupRows, j);
    }
    for (; r < chunk_end; ++r) {
      for (int64_t j = 0; j < features; ++j) add_rows(r, r + 1, j);
    }
    for (int64_t j = 0; j < features; ++j) {
      s1[j] += acc1[j];
      s2[j] += acc2[j];
    }
  }
}

// Columns [j, j + kVectors * kLanes) of rows [begin, end) of a (rows,
// features) array into float64 sums s1, s2; the accumulators stay in
// registers while the rows stream past.
template <typename A, typename B, bool kSquare, int kVectors>
void SumTile(const A* a, const B* b, const float* shift_a, const float* shift_b,
             int64_t begin, int64_t end, int64_t features, int64_t j, double* s1,
             double* s2) {
  Lanes sa[kVectors], sb[kVectors], acc1[kVectors] = {}, acc2[kVectors] = {};
  for (int q = 0; q < kVectors; ++q) {
    sa[q] = LoadLanes(shift_a + j + q * kLanes);
    sb[q] = LoadLanes(shift_b + j + q * kLanes);
  }
  for (int64_t r = begin; r < end; ++r) {
    for (int q = 0; q < kVectors; ++q) {
      Lanes u = LoadLanes(a + r * features + j + q * kLanes) - sa[q];
      Lanes v = kSquare ? u : LoadLanes(b + r * features + j + q * kLanes) - sb[q];
      acc1[q] += u;
      acc2[q] += u * v;
    }
  }
  float sum1[kVectors * kLanes], sum2[kVectors * kLanes];
  std::memcpy(sum1, acc1, sizeof sum1);
  std::memcpy(sum2, acc2, sizeof sum2);
  for (int64_t l = 0; l < kVectors * kLanes; ++l) {
    s1[j + l] += sum1[l];
    s2[j + l] += sum2[l];
  }
}

// SumRowBlock for short rows (at most kTile values): a chunk's rows are
// read column tile by column tile, with the accumulators in registers
// rather than in memory. The same additions in the same order.
template <typename A, typename B, bool kSquare>
void SumShortRowBlock(const A* a, const B* b, const float* shift_a, const float* shift_b,
                      int64_t begin, int64_t end, int64_t features, double* s1, double* s2) {
  for (int64_t chunk = begin; chunk < end; chunk += kChunk) {
    int64_t chunk_end = std::min(end, chunk + kChunk);
    int64_t j = 0;
    for (; j + kTile <= features; j += kTile) {
      SumTile<A, B, kSquare, kTile / kLanes>(a, b, shift_a, shift_b, chunk, chunk_end,
                                             features, j, s1, s2);
    }
    for (; j + kLanes <= features; j += kLanes) {
      SumTile<A, B, kSquare, 1>(a, b, shift_a, shift_b, chunk, chunk_end, features, j, s1, s2);
    }
    for (; j < features; ++j) {  // the last features % kLanes, one at a time
      float acc1 = 0, acc2 = 0;
      for (int64_t r = chunk; r < chunk_end; ++r) {
        float u = Load(a, r * features + j) - shift_a[j];
        float v = kSquare ? u : Load(b, r * features + j) - shift_b[j];
        acc1 += u;
        acc2 += u * v;
      }
      s1[j] += acc1;
      s2[j] += acc2;
    }
  }
}

// Features last (inner = 1): blocks of rows, each summed into its own
// float64 partials, which are added in block order at the end.
template <typename A, typename B, bool kSquare>
void SumRows(ffi::ThreadPool& pool, const A* a, const B* b, const float* shift_a,
             const float* shift_b, int64_t rows, int64_t features, float* out1,
             float* out2) {
  int64_t block = std::max<int64_t>(
      kChunk, kTaskEntries / std::max<int64_t>(features, 1) / kChunk * kChunk);
  int64_t blocks = std::max<int64_t>((rows + block - 1) / block, 1);
  SumBlocksInOrder(pool, blocks, features, [=](int64_t k, double* s1, double* s2) {
    auto sum_block = features <= kTile ? SumShortRowBlock<A, B, kSquare>
                                       : SumRowBlock<A, B, kSquare>;
    sum_block(a, b, shift_a, shift_b, k * block, std::min(rows, (k + 1) * block), features,
              s1, s2);
  }, out1, out2);
}

// One contiguous run of n values into float64 sums t1, t2: 16 lanes of at
// most 64 values each between flushes.
template <typename A, typename B, bool kSquare>
void SumRun(const A* a, const B* b, float shift_a, float shift_b, int64_t n, double& t1,
            double& t2) {
  for (int64_t start = 0; start < n; start += kLanes * kChunk) {
    int64_t end = std::min(n, start + kLanes * kChunk);
    Lanes lane1 = {}, lane2 = {};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes) {
      Lanes u = LoadLanes(a + i) - shift_a;
      Lanes v = kSquare ? u : LoadLanes(b + i) - shift_b;
      lane1 += u;
      lane2 += u * v;
    }
    float sum1[kLanes], sum2[kLanes];
    std::memcpy(sum1, &lane1, sizeof sum1);
    std::memcpy(sum2, &lane2, sizeof sum2);
    for (int64_t l = 0; i + l < end; ++l) {  // the rest, one per lane
      float u = Load(a, i + l) - shift_a;
      float v = kSquare ? u : Load(b, i + l) - shift_b;
      sum1[l] += u;
      sum2[l] += u * v;
    }
    for (int64_t l = 0; l < kLanes; ++l) {
      t1 += sum1[l];
      t2 += sum2[l];
    }
  }
}

// Features in the middle (inner > 1): runs of `inner` values, one per
// (outer, feature) pair. Many outer indices: blocks of them in memory
// order, each summed into its own float64 partials, added in block order
// at the end. Few: the features are split among the tasks instead.
template <typename A, typename B, bool kSquare>
void SumRuns(ffi::ThreadPool& pool, const A* a, const B* b, const float* shift_a,
             const float* shift_b, int64_t outer, int64_t features, int64_t inner,
             float* out1, float* out2) {
  auto runs = [=](int64_t o_begin, int64_t o_end, int64_t c_begin, int64_t c_end, double* s1,
                  double* s2) {
    for (int64_t o = o_begin; o < o_end; ++o) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        int64_t offset = (o * features + c) * inner;
        SumRun<A, B, kSquare>(a + offset, b + offset, shift_a[c], shift_b[c], inner, s1[c],
                              s2[c]);
      }
    }
  };
  int64_t block = std::max<int64_t>(1, kTaskEntries / std::max<int64_t>(features * inner, 1));
  int64_t blocks = (outer + block - 1) / block;
  if (blocks < 4) {
    int64_t per_task = std::max<int64_t>(1, kTaskEntries / std::max<int64_t>(outer * inner, 1));
    auto sums = std::make_shared<std::vector<double>>(2 * features, 0.0);
    ParallelFor(pool, (features + per_task - 1) / per_task, [=](int64_t k) {
      runs(0, outer, k * per_task, std::min(features, (k + 1) * per_task), sums->data(),
           sums->data() + features);
    });
    for (int64_t c = 0; c < features; ++c) {
      out1[c] = static_cast<float>((*sums)[c]);
      out2[c] = static_cast<float>((*sums)[features + c]);
    }
    return;
  }
  SumBlocksInOrder(pool, blocks, features, [=](int64_t k, double* s1, double* s2) {
    runs(k * block, std::min(outer, (k + 1) * block), 0, features, s1, s2);
  }, out1, out2);
}

template <typename A, typename B, bool kSquare>
void Sums(ffi::ThreadPool& pool, const A* a, const B* b, const float* shift_a,
          const float* shift_b, int64_t outer, int64_t features, int64_t inner,
          float* out1, float* out2) {
  if (inner == 1) {
    SumRows<A, B, kSquare>(pool, a, b, shift_a, shift_b, outer, features, out1, out2);
  } else {
    SumRuns<A, B, kSquare>(pool, a, b, shift_a, shift_b, outer, features, inner, out1, out2);
  }
}

bool IsBf16(const ffi::AnyBuffer& x) { return x.element_type() == ffi::BF16; }

template <typename A>
const A* Data(const ffi::AnyBuffer& x) {
  return reinterpret_cast<const A*>(x.untyped_data());
}

template <bool kSquare>
ffi::Error Dispatch(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                    ffi::Buffer<ffi::F32> shift_a, ffi::Buffer<ffi::F32> shift_b,
                    int64_t inner, ffi::ResultBuffer<ffi::F32> out1,
                    ffi::ResultBuffer<ffi::F32> out2) {
  int64_t features = shift_a.element_count();
  int64_t size = a.element_count();
  if (features == 0) return ffi::Error::Success();
  for (const ffi::AnyBuffer* x : {&a, &b}) {
    if (x->element_type() != ffi::F32 && x->element_type() != ffi::BF16) {
      return ffi::Error::InvalidArgument("jaxbn native sums: float32 or bfloat16 operands only");
    }
    if (x->element_count() != size || inner < 1 || size % (features * inner) != 0) {
      return ffi::Error::InvalidArgument(
          "jaxbn native sums: operands must hold (outer, features, inner) arrays");
    }
  }
  int64_t outer = size / (features * inner);
  const float* sa = shift_a.typed_data();
  const float* sb = shift_b.typed_data();
  float* o1 = out1->typed_data();
  float* o2 = out2->typed_data();
  if (IsBf16(a) && IsBf16(b)) {
    Sums<uint16_t, uint16_t, kSquare>(pool, Data<uint16_t>(a), Data<uint16_t>(b), sa, sb,
                                      outer, features, inner, o1, o2);
  } else if (IsBf16(a)) {
    Sums<uint16_t, float, kSquare>(pool, Data<uint16_t>(a), Data<float>(b), sa, sb, outer,
                                   features, inner, o1, o2);
  } else if (IsBf16(b)) {
    Sums<float, uint16_t, kSquare>(pool, Data<float>(a), Data<uint16_t>(b), sa, sb, outer,
                                   features, inner, o1, o2);
  } else {
    Sums<float, float, kSquare>(pool, Data<float>(a), Data<float>(b), sa, sb, outer,
                                features, inner, o1, o2);
  }
  return ffi::Error::Success();
}

ffi::Error SquareSums(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> shift_a,
                      int64_t inner, ffi::ResultBuffer<ffi::F32> out1,
                      ffi::ResultBuffer<ffi::F32> out2) {
  return Dispatch<true>(pool, a, a, shift_a, shift_a, inner, out1, out2);
}

ffi::Error ProductSums(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> shift_a,
                       ffi::AnyBuffer b, ffi::Buffer<ffi::F32> shift_b, int64_t inner,
                       ffi::ResultBuffer<ffi::F32> out1, ffi::ResultBuffer<ffi::F32> out2) {
  return Dispatch<false>(pool, a, b, shift_a, shift_b, inner, out1, out2);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnSquareSums, SquareSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("inner")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnProductSums, ProductSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("inner")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
