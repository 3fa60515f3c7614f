"""cffi builder for ``kvmfw.abi._kvm``: the arch-neutral KVM ABI, compiled in API mode.

API mode (``set_source`` against ``<linux/kvm.h>``) means every struct size and field offset
below comes from the C compiler, never from a hand-typed number: a field name that does not
exist in the host headers is a build error, not silent guest corruption. Architecture
plugins build their own module for ``<asm/kvm.h>`` structs and pass buffers to the one ioctl
wrapper here (``kvmfw_ioctl``) by address.

Besides the structs this module carries tiny C helpers that Python cannot express without
a compiler: the ioctl call itself (returning ``-errno`` so the hot path needs no second
lookup), the kick-signal handler (sets ``immediate_exit`` of the calling thread's vCPU), a
POSIX timer aimed at one thread (``SIGEV_THREAD_ID``), and ``perf_event_open``.
"""

from cffi import FFI

CDEF = r"""
/* The kernel's own 64-bit type: `unsigned long long` on most ABIs, `unsigned long` where
   asm/int-l64.h applies. An array field's pointer type must match it exactly, or compilers
   where incompatible pointer types are errors (GCC 14) refuse cffi's field checks. */
typedef int... __u64;
struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size;
    uint64_t userspace_addr; ...;
};
struct kvm_coalesced_mmio_zone { uint64_t addr; uint32_t size; uint32_t pio; ...; };
struct kvm_coalesced_mmio {
    uint64_t phys_addr; uint32_t len; uint32_t pio; uint8_t data[8]; ...;
};
struct kvm_coalesced_mmio_ring { uint32_t first; uint32_t last; ...; };
struct kvm_irq_level { uint32_t irq; uint32_t level; ...; };
struct kvm_one_reg { uint64_t id; uint64_t addr; ...; };
struct kvm_reg_list { uint64_t n; ...; };
struct kvm_create_device { uint32_t type; uint32_t fd; uint32_t flags; ...; };
struct kvm_device_attr { uint32_t flags; uint32_t group; uint64_t attr; uint64_t addr; ...; };
struct kvm_signal_mask { uint32_t len; ...; };
struct kvm_enable_cap { uint32_t cap; uint32_t flags; __u64 args[4]; ...; };
struct kvm_dirty_log { uint32_t slot; void *dirty_bitmap; ...; };
struct kvm_clear_dirty_log {
    uint32_t slot; uint32_t num_pages; uint64_t first_page; void *dirty_bitmap; ...;
};
struct kvm_guest_debug { uint32_t control; ...; };
struct kvm_irq_routing_irqchip { uint32_t irqchip; uint32_t pin; };
struct kvm_irq_routing_entry {
    uint32_t gsi; uint32_t type; uint32_t flags;
    union { struct kvm_irq_routing_irqchip irqchip; uint32_t pad[8]; } u;
    ...;
};
struct kvm_irq_routing { uint32_t nr; uint32_t flags; ...; };
struct kvm_irqfd { uint32_t fd; uint32_t gsi; uint32_t flags; uint32_t resamplefd; ...; };
struct kvm_ioeventfd {
    uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd; uint32_t flags; ...;
};

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count;
                 uint64_t data_offset; } io;
        struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; } mmio;
        struct { uint64_t nr; uint64_t args[6]; uint64_t ret; uint32_t longmode;
                 uint32_t pad; } hypercall;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        struct { uint32_t suberror; uint32_t ndata; uint64_t flags;
                 union { struct { uint8_t insn_size; uint8_t insn_bytes[15]; }; };
               } emulation_failure;
        struct { uint32_t type; uint32_t ndata; uint64_t data[16]; } system_event;
        struct { uint8_t error; uint8_t pad[7]; uint32_t reason; uint32_t index;
                 uint64_t data; } msr;
        char padding[256];
    };
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    ...;
};

int kvmfw_ioctl(int fd, unsigned long request, uintptr_t arg);
int kvmfw_run(int fd);
int kvmfw_install_kick_handler(int signo);
void kvmfw_bind_run(uintptr_t run);
int kvmfw_unbind_run(uintptr_t run);
int kvmfw_half_entry(int fd, uintptr_t run);
int kvmfw_gettid(void);
intptr_t kvmfw_timer_create(int signo, int tid);
int kvmfw_timer_arm(intptr_t timer, int64_t deadline_ns);
int64_t kvmfw_timer_disarm(intptr_t timer);
int kvmfw_timer_delete(intptr_t timer);
int kvmfw_perf_open(uint32_t type, uint64_t config, int exclude_host);
int64_t kvmfw_perf_read(int fd);

struct kvmfw_fast_range {
    uint64_t base; uint64_t end; uint32_t space; uint32_t kind; const uint8_t *value;
    const uint8_t *gate; uint32_t width; uint32_t pad;
};
struct kvmfw_fast_latch { uint64_t addr; uint32_t len; uint32_t set; uint8_t data[8]; };
#define KVMFW_RING_PENDING ...
int kvmfw_run_fast(int fd, uintptr_t run, uint32_t run_size,
                   const struct kvmfw_fast_range *ranges, uint32_t n,
                   uint64_t *counts, struct kvmfw_fast_latch *latches, uint32_t limit,
                   uint32_t ring_off, uint32_t cursor_off);
struct kvmfw_run_ctx {
    int fd; uint32_t run_size; uintptr_t run; const struct kvmfw_fast_range *ranges;
    uint32_t n; uint32_t limit; uint64_t *counts;
    struct kvmfw_fast_latch *latches; double ticks_per_ns; int64_t t1; uint64_t entries;
    uint64_t exits; uint64_t ns; uint64_t cycles; uint64_t ticks; uint64_t io; uint64_t mmio;
    uint32_t ring_off; uint32_t cursor_off;
    int64_t host0; int64_t tick0; int64_t ticks_per_ns_int; int64_t now; int64_t reason;
};
int kvmfw_run_ctx(struct kvmfw_run_ctx *c);
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/kvm.h>
#include <linux/perf_event.h>

/* The one ioctl call: returns the result, or -errno on failure. */
static int kvmfw_ioctl(int fd, unsigned long request, uintptr_t arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* KVM_RUN: cffi releases the GIL around this call. */
static int kvmfw_run(int fd)
{
    int r = ioctl(fd, KVM_RUN, 0);
    return r < 0 ? -errno : r;
}

/* The kvm_run of the vCPU this thread runs (QEMU's scheme): a kick that lands while the
   thread is outside KVM_RUN sets immediate_exit, so the next KVM_RUN returns at once; one
   that lands inside KVM_RUN makes it return with KVM_EXIT_INTR. No signal mask is swapped
   on each entry. */
static __thread struct kvm_run *kvmfw_current_run;

static void kvmfw_bind_run(uintptr_t run)
{
    __atomic_store_n(&kvmfw_current_run, (struct kvm_run *)run, __ATOMIC_SEQ_CST);
}

/* Clear this thread's slot only if it still holds ``run``: a thread that has since bound
   another vCPU (another VM's) keeps that binding. Returns 1 if it cleared the slot. */
static int kvmfw_unbind_run(uintptr_t run)
{
    struct kvm_run *expected = (struct kvm_run *)run;
    return __atomic_compare_exchange_n(&kvmfw_current_run, &expected, NULL, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* KVM_RUN only to complete a pending IO/MMIO: immediate_exit is set to 2 (a kick sets 1)
   and afterwards cleared only if it still holds our 2, so a kick that lands before or
   during the half entry stays pending for the next entry instead of being erased. */
static int kvmfw_half_entry(int fd, uintptr_t run)
{
    struct kvm_run *r = (struct kvm_run *)run;
    uint8_t zero = 0, ours = 2;
    __atomic_compare_exchange_n(&r->immediate_exit, &zero, 2, 0,
                                __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    int ret = ioctl(fd, KVM_RUN, 0);
    ret = ret < 0 ? -errno : ret;
    __atomic_compare_exchange_n(&r->immediate_exit, &ours, 0, 0,
                                __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return ret;
}

static void kvmfw_kick_handler(int sig, siginfo_t *info, void *ctx)
{
    (void)sig; (void)info; (void)ctx;
    struct kvm_run *run = __atomic_load_n(&kvmfw_current_run, __ATOMIC_SEQ_CST);
    if (run)
        __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_RELAXED);
}

static int kvmfw_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = kvmfw_kick_handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;   /* other syscalls of the thread carry on */
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}

static int kvmfw_gettid(void) { return (int)syscall(SYS_gettid); }

static intptr_t kvmfw_timer_create(int signo, int tid)
{
    struct sigevent sev;
    timer_t t;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = signo;
    sev._sigev_un._tid = tid;
    if (timer_create(CLOCK_MONOTONIC, &sev, &t) < 0)
        return -errno;
    return (intptr_t)t;
}

static int kvmfw_timer_arm(intptr_t timer, int64_t deadline_ns)
{
    struct itimerspec its;
    memset(&its, 0, sizeof(its));
    if (deadline_ns <= 0)
        deadline_ns = 1;
    its.it_value.tv_sec = deadline_ns / 1000000000LL;
    its.it_value.tv_nsec = deadline_ns % 1000000000LL;
    return timer_settime((timer_t)timer, TIMER_ABSTIME, &its, NULL) < 0 ? -errno : 0;
}

/* Disarm; returns the nanoseconds that were left (0 = it had expired). */
static int64_t kvmfw_timer_disarm(intptr_t timer)
{
    struct itimerspec its, old;
    memset(&its, 0, sizeof(its));
    if (timer_settime((timer_t)timer, 0, &its, &old) < 0)
        return -errno;
    return (int64_t)old.it_value.tv_sec * 1000000000LL + old.it_value.tv_nsec;
}

static int kvmfw_timer_delete(intptr_t timer)
{
    return timer_delete((timer_t)timer) < 0 ? -errno : 0;
}

/* A counting perf event on the calling thread (guest only when exclude_host). */
static int kvmfw_perf_open(uint32_t type, uint64_t config, int exclude_host)
{
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.size = sizeof(attr);
    attr.type = type;
    attr.config = config;
    attr.exclude_hv = 1;
    attr.exclude_host = exclude_host ? 1 : 0;
    long fd = syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0);
    return fd < 0 ? -errno : (int)fd;
}

static int64_t kvmfw_perf_read(int fd)
{
    uint64_t v;
    ssize_t n = read(fd, &v, sizeof(v));
    return n == (ssize_t)sizeof(v) ? (int64_t)v : -errno;
}

/* The compiled exit path (kvmfw/fastpath.py builds the table). Range kinds (bits): a sink
   drops writes, a constant answers reads with the bytes at ``value``, a latch keeps the
   last write for Python to deliver (coalescible posted writes). A constant with ``gate``
   (one byte per byte of the range) is live: its device rewrites ``value`` as registers
   change and clears a byte's gate while reading it would have side effects or needs the
   device; a read that touches a closed byte goes to Python. ``width`` (0: any): the
   registers' width; a read answered here is one register or part of it from its start
   (others go to the device, which decides what odd accesses do). Space 0 is port IO,
   1 MMIO. */
#define KVMFW_FAST_SINK 1u
#define KVMFW_FAST_CONST 2u
#define KVMFW_FAST_LATCH 4u
#define KVMFW_FAST_ONES 8u

struct kvmfw_fast_range {
    uint64_t base; uint64_t end; uint32_t space; uint32_t kind; const uint8_t *value;
    const uint8_t *gate; uint32_t width; uint32_t pad;
};
struct kvmfw_fast_latch { uint64_t addr; uint32_t len; uint32_t set; uint8_t data[8]; };

/* Whether a read of ``len`` bytes at ``off`` in a constant range may be answered here:
   when it fits the range's register width, and for a live constant, when every byte's
   gate is open (the device may write the gates from another thread: read each once). */
static int kvmfw_fast_open(const struct kvmfw_fast_range *f, uint64_t off, uint32_t len)
{
    if (f->width && (len > f->width || off % f->width))
        return 0;
    if (!f->gate)
        return 1;
    for (uint32_t k = 0; k < len; k++)
        if (!((const volatile uint8_t *)f->gate)[off + k])
            return 0;
    return 1;
}

/* Returned with the count below when the VM's coalesced ring holds writes: Python replays
   them before it services the exit. */
#define KVMFW_RING_PENDING (1 << 30)

/* KVM_RUN, then answer the exits the table covers and re-enter, without Python. Returns
   -errno of a failed KVM_RUN, else the number of exits answered here before the one left
   for Python to service (added to counts[0] too, also after a failure: the counters add up
   until Python folds them into its stats), with KVMFW_RING_PENDING set when ``ring_off``
   (the coalesced ring's offset in the run area, 0: none) finds writes waiting there:
   ``last`` is not kvmfw's read cursor, the word at ``cursor_off`` (``first`` lags it at
   the ring's wrap, see kvmfw.coalesced). Reads, sink writes and unclaimed accesses are
   still answered here while writes wait in the ring: a device posts writes there only when
   they change nothing the table answers (the ``coalesced`` service's contract), so a
   console's polls of its status register stay here while its output bytes queue in the
   ring. A latched write returns instead (Python delivers the ring first: writes to devices
   stay in the guest's order), as does the ring filling up (KVM then exits for the write
   that did not fit, which is not in the table). A kick or the run timer sets
   immediate_exit, so the next KVM_RUN returns -EINTR (after completing the answered
   access, as KVM does for any pending IO): both reach Python exactly as in its own loop.
   ``limit`` bounds the time between returns, so a signal handled by Python (Ctrl-C) and
   the machine's stop requests are seen promptly even when the guest does nothing but fast
   exits (the exit after the limit goes to Python, whose ordinary path answers it the same
   way). counts[0] counts the exits answered here, counts[1] those of port IO, counts[2]
   those of MMIO, counts[3] is set when a latch took a write (Python delivers it before the
   exit), counts[4 + 2 * i + is_write] those of range i. A range is in bytes [base, end);
   an access must lie inside one. */
static int kvmfw_run_fast(int fd, uintptr_t run_addr, uint32_t run_size,
                          const struct kvmfw_fast_range *ranges, uint32_t n,
                          uint64_t *counts,
                          struct kvmfw_fast_latch *latches, uint32_t limit,
                          uint32_t ring_off, uint32_t cursor_off)
{
    struct kvm_run *run = (struct kvm_run *)run_addr;
    const volatile struct kvm_coalesced_mmio_ring *ring =
        ring_off ? (const volatile struct kvm_coalesced_mmio_ring *)(run_addr + ring_off) : 0;
    const volatile uint32_t *cursor = (const volatile uint32_t *)(run_addr + cursor_off);
    uint32_t done = 0;
    for (;;) {
        int r = ioctl(fd, KVM_RUN, 0);
        if (r < 0)
            return -errno;
        int ret = (int)done;  /* what a return to Python says from here */
        if (ring && ring->last != *cursor)
            ret |= KVMFW_RING_PENDING;
        if (done >= limit)
            return ret;
        uint64_t addr;
        uint32_t len, space, is_write;
        uint8_t *data;
        if (run->exit_reason == KVM_EXIT_IO) {
            if (run->io.count != 1)
                return ret;  /* string IO: Python checks and loops */
            len = run->io.size;
            if (len > 8 || run->io.data_offset > run_size
                    || len > run_size - run->io.data_offset)
                return ret;  /* inconsistent: Python reports it */
            addr = run->io.port;
            data = (uint8_t *)run + run->io.data_offset;
            is_write = run->io.direction == KVM_EXIT_IO_OUT;
            space = 0;
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            len = run->mmio.len;
            if (len > 8)
                return ret;
            addr = run->mmio.phys_addr;
            data = run->mmio.data;
            is_write = run->mmio.is_write != 0;
            space = 1;
        } else {
            return ret;
        }
        /* An access lies wholly inside its range, except a port access to an unclaimed
           port: the Python bus dispatches port IO by its first port, so a dword at 0xCF8
           is unclaimed when 0xCF8 is, whatever answers 0xCF9. */
        uint32_t i;
        const struct kvmfw_fast_range *f = ranges;
        for (i = 0; i < n; i++, f++)
            if (f->space == space && addr >= f->base && addr < f->end
                    && (len <= f->end - addr || (space == 0 && (f->kind & KVMFW_FAST_ONES))))
                break;
        if (i == n || len == 0)
            return ret;
        if (is_write) {
            if (f->kind & KVMFW_FAST_SINK) {
            } else if (f->kind & KVMFW_FAST_LATCH) {
                struct kvmfw_fast_latch *l = &latches[i];
                if (ret & KVMFW_RING_PENDING)
                    return ret;  /* the ring's writes came first */
                if (l->set && (l->addr != addr || l->len != len))
                    return ret;  /* another register: Python delivers the first */
                l->addr = addr;
                l->len = len;
                memcpy(l->data, data, len);
                l->set = 1;
                counts[3] = 1;
            } else {
                return ret;
            }
        } else {
            if (f->kind & KVMFW_FAST_ONES)
                memset(data, 0xff, len);
            else if ((f->kind & KVMFW_FAST_CONST) && kvmfw_fast_open(f, addr - f->base, len))
                memcpy(data, f->value + (addr - f->base), len);
            else
                return ret;
        }
        counts[0]++;
        counts[1 + space]++;
        counts[4 + 2 * i + is_write]++;
        done++;
    }
}

/* One vCPU's entry in one struct: the run loop passes a single pointer (each Python
   argument or counter costs bytecodes on every exit). n = 0: a plain KVM_RUN. The clock
   is read on both sides here; the time and exits are summed for Python to fold into the
   stats (exits, ns, and with ticks_per_ns > 0, the monotonic clock being the cycle
   source, cycles and simulated ticks), and the IO and MMIO exits left for Python; t1 is
   when KVM_RUN returned, entries never resets; ring_off and cursor_off: see
   kvmfw_run_fast. The exit's reason and, with ticks_per_ns_int > 0, the simulated tick
   at t1 (tick0 + (t1 - host0) * ticks_per_ns_int; -1 if that overflows 64 bits: Python
   computes it then) are left in reason and now, where Python reads them as two machine
   words: reading cffi fields and multiplying Python ints cost ~200 ns an exit. */
struct kvmfw_run_ctx {
    int fd; uint32_t run_size; uintptr_t run; const struct kvmfw_fast_range *ranges;
    uint32_t n; uint32_t limit; uint64_t *counts;
    struct kvmfw_fast_latch *latches; double ticks_per_ns; int64_t t1; uint64_t entries;
    uint64_t exits; uint64_t ns; uint64_t cycles; uint64_t ticks; uint64_t io; uint64_t mmio;
    uint32_t ring_off; uint32_t cursor_off;
    int64_t host0; int64_t tick0; int64_t ticks_per_ns_int; int64_t now; int64_t reason;
};

static int kvmfw_run_ctx(struct kvmfw_run_ctx *c)
{
    struct timespec a, b;
    uint64_t before = c->counts[0];
    clock_gettime(CLOCK_MONOTONIC, &a);
    int r = kvmfw_run_fast(c->fd, c->run, c->run_size, c->ranges, c->n, c->counts,
                           c->latches, c->limit, c->ring_off, c->cursor_off);
    clock_gettime(CLOCK_MONOTONIC, &b);
    int64_t t0 = (int64_t)a.tv_sec * 1000000000LL + a.tv_nsec;
    int64_t t1 = (int64_t)b.tv_sec * 1000000000LL + b.tv_nsec;
    uint64_t n = 1 + (c->counts[0] - before), ns = (uint64_t)(t1 - t0);
    c->t1 = t1;
    c->entries += n;
    c->exits += n;
    c->ns += ns;
    if (c->ticks_per_ns > 0) {
        c->cycles += ns;
        c->ticks += (uint64_t)((double)ns * c->ticks_per_ns);
    }
    if (c->ticks_per_ns_int > 0) {
        int64_t now;
        if (__builtin_mul_overflow(t1 - c->host0, c->ticks_per_ns_int, &now)
                || __builtin_add_overflow(now, c->tick0, &now))
            now = -1;
        c->now = now;
    }
    if (r >= 0) {
        uint32_t reason = ((struct kvm_run *)c->run)->exit_reason;
        c->reason = reason;
        if (reason == KVM_EXIT_IO)
            c->io++;
        else if (reason == KVM_EXIT_MMIO)
            c->mmio++;
    }
    return r;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvmfw.abi._kvm", SOURCE, libraries=["rt"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
