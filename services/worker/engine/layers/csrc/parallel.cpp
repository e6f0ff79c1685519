// tokenmill::parallel_for (parallel.h): a pool of helper threads; each thread works through a share of the chunks,
// then takes chunks from the others' shares.
//
// Each share is one atomic word packing the job's generation, the share's end and its next unclaimed chunk, so a
// claim (a CAS) only succeeds on the job it was meant for: a helper that wakes late sees a newer generation and
// claims nothing. A thread mostly claims from its own share, a cache line no one else writes until it steals, so
// a claim costs an uncontended CAS (one counter shared by all bounced between the cores: a decode's layer pass ran
// 5-15 % slower), and it reads its share in order, as OpenMP's static split does. The job's fields are written before its generation is
// published and stay put until every chunk is done, which cannot happen while a thread holds one. Done chunks are
// counted per thread (monotonic, on the thread's own line); the caller waits for the sum to reach the job's count.
// Helpers spin a while after each job (a decode step calls ~150 loops back to back), then sleep on a
// condition variable; the caller wakes them only when one sleeps.

#include "ops.h"
#include "parallel.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>

namespace {

constexpr int kChunksPerThread = 4;  // 2, 4 and 8 measured alike; finer leaves less stuck on a descheduled thread
constexpr int kMaxThreads = 256;
constexpr int kIndexBits = 20;  // chunks per job < 2^20
constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;
constexpr uint64_t kGenMask = (uint64_t{1} << (64 - 2 * kIndexBits)) - 1;

thread_local bool in_loop = false;  // nested loops run serially, as at::parallel_for's do

std::chrono::microseconds spin_time() {  // TOKENMILL_POOL_SPIN_US: how long an idle helper spins before sleeping
  const char* env = std::getenv("TOKENMILL_POOL_SPIN_US");
  return std::chrono::microseconds(env ? std::atoll(env) : 500);
}

struct alignas(64) Share {
  std::atomic<uint64_t> word{0};  // generation | end | next, in chunks
};
struct alignas(64) Counter {
  std::atomic<int64_t> done{0};  // chunks this thread has finished, ever
};

class Pool {
 public:
  // Runs f's chunks on this thread and whichever helpers join; false when another thread is using the pool.
  bool run(int64_t begin, int64_t end, int64_t chunk, int64_t chunks, int threads,
           c10::function_ref<void(int64_t, int64_t)> f) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    const int P = std::min(threads, kMaxThreads);
    start_helpers(P - 1);
    f_ = &f, begin_ = begin, end_ = end, chunk_ = chunk, error_ = nullptr;
    participants_.store(P, std::memory_order_relaxed);
    const uint64_t gen = generation_ = (generation_ + 1) & kGenMask;
    // every thread's count: a helper that read a stale thread count may still take chunks of this job
    const int counted = std::max(P, started_ + 1);
    int64_t base = 0;
    for (int t = 0; t < counted; ++t) base += counters_[t].done.load(std::memory_order_relaxed);
    for (int t = 0; t < P; ++t) {
      const uint64_t lo = chunks * t / P, hi = chunks * (t + 1) / P;
      shares_[t].word.store(gen << (2 * kIndexBits) | hi << kIndexBits | lo, std::memory_order_relaxed);
    }
    published_.store(gen, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      sleep_cv_.notify_all();
    }
    work(gen, 0, P);
    for (;;) {  // the chunks still in a helper's hands
      int64_t done = 0;
      for (int t = 0; t < counted; ++t) done += counters_[t].done.load(std::memory_order_acquire);
      if (done - base >= chunks) break;
      _mm_pause();
    }
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  // Thread `self` runs chunks of generation `gen`: its own share, then what is left of the others'.
  void work(uint64_t gen, int self, int P) {
    for (int k = 0; k < P; ++k) {
      std::atomic<uint64_t>& word = shares_[(self + k) % P].word;
      uint64_t w = word.load(std::memory_order_acquire);
      for (;;) {
        const uint64_t next = w & kIndexMask, hi = (w >> kIndexBits) & kIndexMask;
        if (w >> (2 * kIndexBits) != gen || next >= hi) break;
        if (!word.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
        const int64_t b = begin_ + static_cast<int64_t>(next) * chunk_, e = std::min(end_, b + chunk_);
        in_loop = true;
        try {
          (*f_)(b, e);
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mu_);
          if (!error_) error_ = std::current_exception();
        }
        in_loop = false;
        counters_[self].done.fetch_add(1, std::memory_order_release);
        w = word.load(std::memory_order_acquire);
      }
    }
  }

  void start_helpers(int n) {
    for (; started_ < n; ++started_) std::thread([this, i = started_ + 1] { helper(i); }).detach();
  }

  void helper(int self) {
    const auto spin = spin_time();
    uint64_t seen = 0;
    for (;;) {
      auto idle_since = std::chrono::steady_clock::now();
      uint64_t gen;
      for (int i = 1;; ++i) {
        gen = published_.load(std::memory_order_acquire);
        if (gen != seen) break;
        _mm_pause();
        if (i % 256 == 0 && std::chrono::steady_clock::now() - idle_since > spin) {
          std::unique_lock<std::mutex> lock(sleep_mu_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          sleep_cv_.wait(lock, [&] { return published_.load(std::memory_order_seq_cst) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_relaxed);
          idle_since = std::chrono::steady_clock::now();
        }
      }
      seen = gen;
      const int P = participants_.load(std::memory_order_relaxed);  // stale: it only decides whether to help
      if (self < P) work(gen, self, P);
    }
  }

  Share shares_[kMaxThreads];
  Counter counters_[kMaxThreads];
  std::mutex busy_;
  std::atomic<uint64_t> published_{0};
  std::atomic<int> sleeping_{0}, participants_{0};
  std::mutex sleep_mu_, error_mu_;
  std::condition_variable sleep_cv_;
  uint64_t generation_ = 0;
  int started_ = 0;
  // the job: written before its generation is published, read by whoever claims one of its chunks
  const c10::function_ref<void(int64_t, int64_t)>* f_ = nullptr;
  int64_t begin_ = 0, end_ = 0, chunk_ = 1;
  std::exception_ptr error_;
};

std::atomic<Pool*> pool{nullptr};

Pool& instance() {
  static const bool registered = [] {
    // a forked child has none of the helper threads: it starts a pool of its own (the old one is left as is)
    pthread_atfork(nullptr, nullptr, [] { pool.store(nullptr); });
    return true;
  }();
  (void)registered;
  Pool* p = pool.load();
  if (p == nullptr) {
    Pool* fresh = new Pool;  // never freed: detached helpers use it until the process ends
    if (pool.compare_exchange_strong(p, fresh)) p = fresh;
    else delete fresh;
  }
  return *p;
}

}  // namespace

void tokenmill::parallel_for(int64_t begin, int64_t end, int64_t grain,
                             c10::function_ref<void(int64_t, int64_t)> f) {
  if (begin >= end) return;
  const int64_t n = end - begin, g = std::max<int64_t>(grain, 1), threads = at::get_num_threads();
  const int64_t grains = (n + g - 1) / g;
  const int64_t chunk = g * std::max<int64_t>(1, (grains + threads * kChunksPerThread - 1) / (threads * kChunksPerThread));
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (threads <= 1 || chunks <= 1 || in_loop ||
      !instance().run(begin, end, chunk, chunks, static_cast<int>(threads), f))
    f(begin, end);
}

// For tests: how often parallel_for(0, n, grain) visited each index (each chunk runs a nested loop over its
// range, which must run serially); the chunk holding `fail_at` (>= 0) throws.
at::Tensor parallel_cover(int64_t n, int64_t grain, int64_t fail_at) {
  auto counts = at::zeros({n}, at::kLong);
  int64_t* c = counts.data_ptr<int64_t>();
  tokenmill::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    TORCH_CHECK(fail_at < begin || fail_at >= end, "parallel_cover: failing at index ", fail_at);
    tokenmill::parallel_for(begin, end, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) __atomic_fetch_add(c + i, 1, __ATOMIC_RELAXED);
    });
  });
  return counts;
}
