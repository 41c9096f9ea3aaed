// The scheduler of the CUDA emulation (cuda_emu.h): blocks of fibers, barriers,
// warp collectives, shared memory and launch checks.
#include "cuda_emu.h"

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define FFN_EMU_ASAN 1
#else
#define FFN_EMU_ASAN 0
#endif


// Switching between fibers. On x86-64 a few instructions that swap the
// callee-saved registers and the stack pointer (glibc's swapcontext makes two
// system calls per switch, for the signal mask, and ASan's interceptor of it
// clears the shadow of the whole target stack); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void ffn_emu_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .globl ffn_emu_switch
  .type ffn_emu_switch, @function
ffn_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ffn_emu_switch, .-ffn_emu_switch
)");

namespace ffn::emu {
namespace {
struct Context {
  void* sp = nullptr;
};
// A context that starts entry() on the stack [stack, stack + bytes): the frame
// ffn_emu_switch pops (floating-point control words, six registers, entry as
// the return address), with the stack aligned as at a function's entry.
void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uint64_t*>(
      reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
  uint64_t* sp = top - 9;
#if FFN_EMU_ASAN
  // The previous fiber on this stack ended inside fiber_entry, whose frame's
  // redzones are still poisoned.
  __asan_unpoison_memory_region(stack + bytes - 4096, 4096);
#endif
  unsigned mxcsr = 0;
  unsigned short fpcw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  sp[0] = uint64_t{mxcsr} | (uint64_t{fpcw} << 32);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(entry);
  sp[8] = 0;  // entry's own return address: it never returns
  c.sp = sp;
}
void switch_context(Context& from, Context& to) { ffn_emu_switch(&from.sp, to.sp); }
}  // namespace
}  // namespace ffn::emu
#else
namespace ffn::emu {
namespace {
struct Context {
  ucontext_t uc;
};
void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
}  // namespace
}  // namespace ffn::emu
#endif

namespace ffn::emu {
namespace {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kGuardBytes = 4096;

enum class State { kRunnable, kBarrier, kWarp, kDone };
enum class WarpOp { kShuffle, kSyncwarp };

struct Thread {
  Context context;
  char* stack = nullptr;
  State state = State::kRunnable;
  ThreadCoords coords;
  int linear = 0;
  // A pending warp collective.
  WarpOp op = WarpOp::kShuffle;
  unsigned mask = 0;
  uint64_t offered = 0, received = 0;
  int src_lane = 0;
  void* fake_stack = nullptr;  // ASan's, while switched out
};

// Fiber stacks, reused by every block this OS thread runs.
struct StackPool {
  std::vector<char*> stacks;
  char* get(size_t i) {
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw Error("cuda emulation: cannot map a fiber stack");
      mprotect(p, kGuardBytes, PROT_NONE);  // stack overflow faults instead of corrupting
      stacks.push_back(static_cast<char*>(p) + kGuardBytes);
    }
    return stacks[i];
  }
  // After a failed block: its fibers never returned, and ASan's poisoning of
  // their frames is still in the shadow of the stacks.
  void clear_abandoned_frames() {
#if FFN_EMU_ASAN
    for (char* s : stacks) __asan_unpoison_memory_region(s, kStackBytes);
#endif
  }
  ~StackPool() {
    for (char* s : stacks) munmap(s - kGuardBytes, kStackBytes + kGuardBytes);
  }
};

struct SharedVariable {
  const void* key;
  void* data;
  size_t bytes;
};

struct Block {
  std::vector<Thread> threads;
  Context scheduler;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  int running = -1;
  std::exception_ptr failure;
  std::vector<SharedVariable> shared;
  size_t static_bytes = 0, static_limit = 0;
  unsigned char* dynamic = nullptr;
  const std::function<void()>* body = nullptr;
};

thread_local Block* tls_block = nullptr;
thread_local StackPool tls_stacks;

std::mutex attribute_mutex;
std::map<const void*, size_t>& dynamic_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

std::string where_string(const std::source_location& where) {
  std::ostringstream s;
  s << where.file_name() << ":" << where.line();
  return s.str();
}

Block& block_or_die(const char* what) {
  if (tls_block == nullptr || tls_block->running < 0) {
    throw Error(std::string("cuda emulation: ") + what + " called outside a kernel");
  }
  return *tls_block;
}

Thread& current_thread(const char* what) {
  Block& b = block_or_die(what);
  return b.threads[b.running];
}

// Switches from the running fiber back to the scheduler.
void yield_to_scheduler(Thread& t) {
  Block& b = *tls_block;
#if FFN_EMU_ASAN
  __sanitizer_start_switch_fiber(&t.fake_stack, b.scheduler_stack_bottom, b.scheduler_stack_size);
#endif
  switch_context(t.context, b.scheduler);
#if FFN_EMU_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
#endif
}

void fiber_entry() {
  Block& b = *tls_block;
#if FFN_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
#endif
  try {
    (*b.body)();
  } catch (...) {
    if (!b.failure) b.failure = std::current_exception();
  }
  Thread& t = b.threads[b.running];
  t.state = State::kDone;
#if FFN_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, b.scheduler_stack_bottom, b.scheduler_stack_size);
#endif
  Context finished;
  switch_context(finished, b.scheduler);
}

void resume(Block& b, int i) {
  Thread& t = b.threads[i];
  b.running = i;
#if FFN_EMU_ASAN
  void* scheduler_fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&scheduler_fake_stack, t.stack, kStackBytes);
#endif
  switch_context(b.scheduler, t.context);
#if FFN_EMU_ASAN
  __sanitizer_finish_switch_fiber(scheduler_fake_stack, nullptr, nullptr);
#endif
  b.running = -1;
}

std::string describe_thread(const Thread& t) {
  std::ostringstream s;
  s << "thread (" << t.coords.thread_idx.x << "," << t.coords.thread_idx.y << ","
    << t.coords.thread_idx.z << ") of block (" << t.coords.block_idx.x << ","
    << t.coords.block_idx.y << "," << t.coords.block_idx.z << ")";
  return s.str();
}

const char* state_name(State s) {
  switch (s) {
    case State::kRunnable: return "running";
    case State::kBarrier: return "at __syncthreads";
    case State::kWarp: return "in a warp collective";
    case State::kDone: return "exited";
  }
  return "?";
}

enum class Order { kForward, kReverse, kShuffle, kMixed };

Order order_from_environment() {
  const char* v = std::getenv("FFN_EMU_ORDER");
  if (v == nullptr || std::string(v) == "mixed") return Order::kMixed;
  if (std::string(v) == "forward") return Order::kForward;
  if (std::string(v) == "reverse") return Order::kReverse;
  if (std::string(v) == "shuffle") return Order::kShuffle;
  throw Error(std::string("FFN_EMU_ORDER must be forward, reverse, shuffle or mixed, got ") + v);
}

uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void permute(std::vector<int>& order, Order kind, uint64_t seed) {
  std::iota(order.begin(), order.end(), 0);
  if (kind == Order::kMixed) kind = static_cast<Order>(seed % 3);
  if (kind == Order::kReverse) std::reverse(order.begin(), order.end());
  if (kind == Order::kShuffle) {
    for (size_t i = order.size(); i > 1; --i) {
      std::swap(order[i - 1], order[mix(seed + i) % i]);
    }
  }
}

// Releases the warp collective that thread `i` waits in once every lane of its
// mask has arrived; errors for collectives that can never complete.
bool try_release_warp(Block& b, int i) {
  const Thread& t = b.threads[i];
  const int first = t.linear / kWarp * kWarp;
  const int n = static_cast<int>(b.threads.size());
  std::vector<int> lanes;
  for (int lane = 0; lane < kWarp; ++lane) {
    if (!(t.mask >> lane & 1u)) continue;
    const int j = first + lane;
    if (j >= n) {
      throw Error("cuda emulation: warp collective with mask " + std::to_string(t.mask) +
                  " names lane " + std::to_string(lane) + ", past the end of the block (" +
                  describe_thread(t) + ")");
    }
    const Thread& u = b.threads[j];
    if (u.state == State::kRunnable) return false;  // not there yet
    if (u.state != State::kWarp || u.mask != t.mask || u.op != t.op) {
      throw Error("cuda emulation: warp collective not reached by every lane of its mask: " +
                  describe_thread(t) + " waits in one, " + describe_thread(u) + " is " +
                  (u.state == State::kWarp ? "in a different one" : state_name(u.state)));
    }
    lanes.push_back(j);
  }
  if (!(t.mask >> (t.linear - first) & 1u)) {
    throw Error("cuda emulation: a lane calls a warp collective whose mask leaves it out (" +
                describe_thread(t) + ")");
  }
  for (int j : lanes) {
    Thread& u = b.threads[j];
    if (u.op == WarpOp::kShuffle) {
      if (!(t.mask >> u.src_lane & 1u)) {
        throw Error("cuda emulation: shuffle reads lane " + std::to_string(u.src_lane) +
                    ", outside its mask (" + describe_thread(u) + ")");
      }
      u.received = b.threads[first + u.src_lane].offered;
    }
  }
  for (int j : lanes) b.threads[j].state = State::kRunnable;
  return true;
}

void run_block(Block& b, uint64_t seed, Order order_kind) {
  const int n = static_cast<int>(b.threads.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.stack = tls_stacks.get(static_cast<size_t>(i));
    make_context(t.context, t.stack, kStackBytes, fiber_entry);
  }
  std::vector<int> order(static_cast<size_t>(n));
  int done = 0;
  for (uint64_t round = 0;; ++round) {
    permute(order, order_kind, mix(seed ^ (round * 0x632be59bd9b4e019ull)));
    bool progressed = false;
    for (int i : order) {
      if (b.threads[i].state != State::kRunnable) continue;
      resume(b, i);
      progressed = true;
      if (b.failure) std::rethrow_exception(b.failure);
      if (b.threads[i].state == State::kDone) ++done;
    }
    if (done == n) return;
    for (int i = 0; i < n; ++i) {
      if (b.threads[i].state == State::kWarp && try_release_warp(b, i)) progressed = true;
    }
    int at_barrier = 0;
    for (const Thread& t : b.threads) at_barrier += t.state == State::kBarrier;
    if (at_barrier > 0 && at_barrier + done == n) {
      if (done > 0) {
        const auto exited = std::find_if(b.threads.begin(), b.threads.end(),
                                         [](const Thread& t) { return t.state == State::kDone; });
        throw Error("cuda emulation: __syncthreads not reached by every thread of the block: " +
                    describe_thread(*exited) + " exited while " + std::to_string(at_barrier) +
                    " threads wait at the barrier");
      }
      for (Thread& t : b.threads) t.state = State::kRunnable;
      progressed = true;
    }
    if (!progressed) {
      std::ostringstream s;
      s << "cuda emulation: the block cannot make progress (a barrier or warp collective that not "
           "every thread reaches):";
      int shown = 0;
      for (const Thread& t : b.threads) {
        if (t.state == State::kDone || shown == 8) continue;
        s << " " << describe_thread(t) << " is " << state_name(t.state) << ";";
        ++shown;
      }
      throw Error(s.str());
    }
  }
}

// Checks the configuration; returns the shared memory (static plus dynamic) a
// block of this kernel may use.
size_t check_launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                    const std::string& where) {
  const DeviceSpec& spec = device_spec();
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  auto fail = [&](const std::string& what) {
    throw Error("cuda emulation: invalid launch at " + where + ": " + what);
  };
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid or block");
  if (threads > static_cast<uint64_t>(spec.max_threads_per_block) || block.x > 1024 ||
      block.y > 1024 || block.z > 64) {
    fail("block of " + std::to_string(block.x) + "x" + std::to_string(block.y) + "x" +
         std::to_string(block.z) + " threads");
  }
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) fail("grid too large");
  size_t limit = spec.default_shared_per_block;
  size_t total = spec.default_shared_per_block;
  {
    const std::lock_guard<std::mutex> lock(attribute_mutex);
    const auto it = dynamic_limits().find(kernel);
    if (it != dynamic_limits().end()) {
      limit = it->second;
      total = spec.max_shared_per_block_optin;
    }
  }
  if (dynamic_smem > limit) {
    fail(std::to_string(dynamic_smem) + " bytes of dynamic shared memory, over the kernel's " +
         std::to_string(limit) + " (cudaFuncSetAttribute raises it up to 227 KiB)");
  }
  return total;
}

DeviceSpec& mutable_device_spec() {
  static DeviceSpec spec;
  return spec;
}

}  // namespace

const DeviceSpec& device_spec() { return mutable_device_spec(); }

void set_sm_count(int sm_count) {
  if (sm_count < 1) throw Error("cuda emulation: sm_count must be >= 1");
  mutable_device_spec().sm_count = sm_count;
}

const ThreadCoords& current() { return current_thread("threadIdx").coords; }

int lane_id() { return current_thread("a shuffle").linear % kWarp; }

void syncthreads() {
  Thread& t = current_thread("__syncthreads");
  t.state = State::kBarrier;
  yield_to_scheduler(t);
}

void syncwarp(unsigned mask) {
  Thread& t = current_thread("__syncwarp");
  t.state = State::kWarp;
  t.op = WarpOp::kSyncwarp;
  t.mask = mask;
  yield_to_scheduler(t);
}

uint64_t warp_exchange(unsigned mask, uint64_t bits, int src_lane) {
  Thread& t = current_thread("a shuffle");
  t.state = State::kWarp;
  t.op = WarpOp::kShuffle;
  t.mask = mask;
  t.offered = bits;
  t.src_lane = src_lane;
  yield_to_scheduler(t);
  return t.received;
}

void* static_shared(const void* key, size_t bytes) {
  Block& b = block_or_die("__shared__");
  for (const SharedVariable& v : b.shared) {
    if (v.key == key) return v.data;
  }
  b.static_bytes += bytes;
  if (b.static_bytes > b.static_limit) {
    throw Error("cuda emulation: " + std::to_string(b.static_bytes) +
                " bytes of static shared memory, over the " + std::to_string(b.static_limit) +
                " this launch leaves (48 KiB at most, and static plus dynamic within the kernel's limit)");
  }
  void* data = std::malloc(bytes);
  std::memset(data, 0xff, bytes);
  b.shared.push_back({key, data, bytes});
  return data;
}

unsigned char* dynamic_shared() { return block_or_die("extern __shared__").dynamic; }

void set_max_dynamic_shared_memory(const void* kernel, size_t bytes) {
  const DeviceSpec& spec = device_spec();
  if (bytes > spec.max_shared_per_block_optin) {
    throw Error("cuda emulation: cudaFuncSetAttribute(MaxDynamicSharedMemorySize) of " +
                std::to_string(bytes) + " bytes, over sm_90's 227 KiB");
  }
  const std::lock_guard<std::mutex> lock(attribute_mutex);
  dynamic_limits()[kernel] = bytes;
}

int max_active_blocks_per_sm(const void* kernel, int block_threads, size_t dynamic_smem) {
  (void)kernel;
  const DeviceSpec& spec = device_spec();
  const size_t per_block = dynamic_smem + 1024 + spec.reserved_shared_per_block;
  const int by_threads = spec.max_threads_per_sm / block_threads;
  const int by_shared = static_cast<int>(spec.shared_per_sm / per_block);
  return std::max(0, std::min({by_threads, by_shared, spec.max_blocks_per_sm}));
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
              const std::function<void()>& body, const std::source_location& where) {
  const std::string at = where_string(where);
  const size_t shared_limit = check_launch(kernel, grid, block, dynamic_smem, at);
  if (tls_block != nullptr) throw Error("cuda emulation: a kernel launched from inside a kernel");
  const DeviceSpec& spec = device_spec();
  const Order order_kind = order_from_environment();
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  static thread_local uint64_t launches = 0;
  const uint64_t launch_seed = mix(++launches);

  // Blocks in a shuffled order: no kernel may depend on the order of blocks.
  std::vector<uint64_t> block_order(blocks);
  std::iota(block_order.begin(), block_order.end(), uint64_t{0});
  for (uint64_t i = blocks; i > 1; --i) std::swap(block_order[i - 1], block_order[mix(launch_seed + i) % i]);

  for (uint64_t linear_block : block_order) {
    Block b;
    b.body = &body;
    b.static_limit = std::min(spec.default_shared_per_block, shared_limit - dynamic_smem);
    // Exactly dynamic_smem bytes are addressable (aligned_alloc rounds up).
    const size_t dynamic_alloc = std::max<size_t>(16, (dynamic_smem + 15) / 16 * 16);
    std::unique_ptr<unsigned char, decltype(&std::free)> dynamic(
        static_cast<unsigned char*>(std::aligned_alloc(16, dynamic_alloc)), &std::free);
    std::memset(dynamic.get(), 0xff, dynamic_alloc);
#if FFN_EMU_ASAN
    __asan_poison_memory_region(dynamic.get() + dynamic_smem, dynamic_alloc - dynamic_smem);
#endif
    b.dynamic = dynamic.get();
    const uint3 block_idx{static_cast<unsigned>(linear_block % grid.x),
                          static_cast<unsigned>(linear_block / grid.x % grid.y),
                          static_cast<unsigned>(linear_block / (uint64_t{grid.x} * grid.y))};
    b.threads.resize(static_cast<size_t>(threads));
    for (int i = 0; i < threads; ++i) {
      Thread& t = b.threads[i];
      t.linear = i;
      t.coords.thread_idx = {static_cast<unsigned>(i) % block.x,
                             static_cast<unsigned>(i) / block.x % block.y,
                             static_cast<unsigned>(i) / (block.x * block.y)};
      t.coords.block_idx = block_idx;
      t.coords.block_dim = block;
      t.coords.grid_dim = grid;
    }
    tls_block = &b;
    try {
      run_block(b, mix(launch_seed ^ linear_block), order_kind);
    } catch (const Error& e) {
      tls_block = nullptr;
      tls_stacks.clear_abandoned_frames();
      for (SharedVariable& v : b.shared) std::free(v.data);
      throw Error(std::string(e.what()) + " [kernel launched at " + at + "]");
    } catch (...) {
      tls_block = nullptr;
      tls_stacks.clear_abandoned_frames();
      for (SharedVariable& v : b.shared) std::free(v.data);
      throw;
    }
    tls_block = nullptr;
#if FFN_EMU_ASAN
    __asan_unpoison_memory_region(dynamic.get(), dynamic_alloc);
#endif
    for (SharedVariable& v : b.shared) std::free(v.data);
  }
}

}  // namespace ffn::emu
