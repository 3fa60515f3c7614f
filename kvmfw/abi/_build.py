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
struct kvm_enable_cap { uint32_t cap; uint32_t flags; uint64_t args[4]; ...; };
struct kvm_dirty_log { uint32_t slot; ...; };
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
"""

SOURCE = r"""
#define _GNU_SOURCE
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
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvmfw.abi._kvm", SOURCE, libraries=["rt"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
