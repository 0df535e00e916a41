// Per-feature pairs of sums in one read, as XLA FFI handlers for the CPU.
//
// XLA:CPU gives each reduction its own pass over memory, so the two sums a
// batch norm needs (sum(x) and sum(x^2) forward; sum(g) and
// sum(g * (x - mean)) backward) read their arrays twice. These handlers
// read them once. jaxbn/_native.py builds this file and describes the
// operands: `a` and `b` are (rows, features) row-major, float32 or
// bfloat16; `shift_a`, `shift_b` are float32 (features,).
//
//   jaxbn_square_sums:  s1 = sum(a - shift_a), s2 = sum((a - shift_a)^2)
//   jaxbn_product_sums: s1 = sum(a - shift_a),
//                       s2 = sum((a - shift_a) * (b - shift_b))
//
// Accuracy and determinism: float32 accumulators over 64 rows, float64
// across those chunks, and blocks of rows summed in block order, so the
// result depends on the shape only, not on the threads that ran it.

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

constexpr int64_t kChunkRows = 64;
// Entries per block: a task's unit of work, large enough to pay for itself.
constexpr int64_t kBlockEntries = 1 << 17;

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) {  // bfloat16
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename A, typename B, bool kSquare>
void SumBlock(const A* a, const B* b, const float* shift_a, const float* shift_b,
              int64_t begin, int64_t end, int64_t features, double* s1,
              double* s2, float* acc1, float* acc2) {
  for (int64_t chunk = begin; chunk < end; chunk += kChunkRows) {
    int64_t chunk_end = std::min(end, chunk + kChunkRows);
    std::fill(acc1, acc1 + features, 0.f);
    std::fill(acc2, acc2 + features, 0.f);
    for (int64_t r = chunk; r < chunk_end; ++r) {
      const A* ar = a + r * features;
      const B* br = b + r * features;
      for (int64_t j = 0; j < features; ++j) {
        float u = Load(ar, j) - shift_a[j];
        float v = kSquare ? u : Load(br, j) - shift_b[j];
        acc1[j] += u;
        acc2[j] += u * v;
      }
    }
    for (int64_t j = 0; j < features; ++j) {
      s1[j] += acc1[j];
      s2[j] += acc2[j];
    }
  }
}

template <typename A, typename B, bool kSquare>
void Sums(ffi::ThreadPool& pool, const A* a, const B* b, const float* shift_a,
          const float* shift_b, int64_t rows, int64_t features, float* out1,
          float* out2) {
  int64_t block_rows = std::max<int64_t>(
      kChunkRows, kBlockEntries / std::max<int64_t>(features, 1) / kChunkRows * kChunkRows);
  int64_t blocks = std::max<int64_t>((rows + block_rows - 1) / block_rows, 1);
  // Shared with tasks that may start after this call has returned.
  struct Work {
    std::vector<double> partial;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto work = std::make_shared<Work>();
  work->partial.assign(blocks * 2 * features, 0.0);
  auto run = [=]() {
    std::vector<float> acc(2 * features);
    for (int64_t k; (k = work->next.fetch_add(1)) < blocks;) {
      double* s = work->partial.data() + k * 2 * features;
      SumBlock<A, B, kSquare>(a, b, shift_a, shift_b, k * block_rows,
                              std::min(rows, (k + 1) * block_rows), features, s,
                              s + features, acc.data(), acc.data() + features);
      work->done.fetch_add(1);
    }
  };
  // The caller works too and never waits for a task that has not started,
  // so a busy (or absent) pool cannot stall it.
  int64_t helpers = std::min<int64_t>(pool.num_threads(), blocks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(run)(run));
  run();
  while (work->done.load() < blocks) std::this_thread::yield();
  for (int64_t j = 0; j < features; ++j) {
    double t1 = 0, t2 = 0;
    for (int64_t k = 0; k < blocks; ++k) {
      t1 += work->partial[k * 2 * features + j];
      t2 += work->partial[k * 2 * features + features + j];
    }
    out1[j] = static_cast<float>(t1);
    out2[j] = static_cast<float>(t2);
  }
}

bool IsBf16(const ffi::AnyBuffer& x) { return x.element_type() == ffi::BF16; }

template <typename A>
const A* Data(const ffi::AnyBuffer& x) {
  return reinterpret_cast<const A*>(x.untyped_data());
}

ffi::Error CheckOperand(const ffi::AnyBuffer& x, int64_t features) {
  auto type = x.element_type();
  if (type != ffi::F32 && type != ffi::BF16) {
    return ffi::Error::InvalidArgument("jaxbn native sums: float32 or bfloat16 operands only");
  }
  auto dims = x.dimensions();
  if (dims.size() != 2 || dims[1] != features) {
    return ffi::Error::InvalidArgument("jaxbn native sums: operands must be (rows, features)");
  }
  return ffi::Error::Success();
}

template <bool kSquare>
ffi::Error Dispatch(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                    ffi::Buffer<ffi::F32> shift_a, ffi::Buffer<ffi::F32> shift_b,
                    ffi::ResultBuffer<ffi::F32> out1, ffi::ResultBuffer<ffi::F32> out2) {
  int64_t features = shift_a.element_count();
  for (const ffi::AnyBuffer* x : {&a, &b}) {
    if (ffi::Error error = CheckOperand(*x, features); error.failure()) return error;
  }
  int64_t rows = a.dimensions()[0];
  const float* sa = shift_a.typed_data();
  const float* sb = shift_b.typed_data();
  float* o1 = out1->typed_data();
  float* o2 = out2->typed_data();
  if (IsBf16(a) && IsBf16(b)) {
    Sums<uint16_t, uint16_t, kSquare>(pool, Data<uint16_t>(a), Data<uint16_t>(b), sa, sb, rows, features, o1, o2);
  } else if (IsBf16(a)) {
    Sums<uint16_t, float, kSquare>(pool, Data<uint16_t>(a), Data<float>(b), sa, sb, rows, features, o1, o2);
  } else if (IsBf16(b)) {
    Sums<float, uint16_t, kSquare>(pool, Data<float>(a), Data<uint16_t>(b), sa, sb, rows, features, o1, o2);
  } else {
    Sums<float, float, kSquare>(pool, Data<float>(a), Data<float>(b), sa, sb, rows, features, o1, o2);
  }
  return ffi::Error::Success();
}

ffi::Error SquareSums(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> shift_a,
                      ffi::ResultBuffer<ffi::F32> out1, ffi::ResultBuffer<ffi::F32> out2) {
  return Dispatch<true>(pool, a, a, shift_a, shift_a, out1, out2);
}

ffi::Error ProductSums(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> shift_a,
                       ffi::AnyBuffer b, ffi::Buffer<ffi::F32> shift_b,
                       ffi::ResultBuffer<ffi::F32> out1, ffi::ResultBuffer<ffi::F32> out2) {
  return Dispatch<false>(pool, a, b, shift_a, shift_b, out1, out2);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnSquareSums, SquareSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxbnProductSums, ProductSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
