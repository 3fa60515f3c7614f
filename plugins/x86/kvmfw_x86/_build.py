"""cffi builder for ``kvmfw_x86._x86``: the x86 KVM structs, compiled in API mode.

Every size and offset comes from the host's ``<linux/kvm.h>``/``<asm/kvm.h>`` and
``<asm/bootparam.h>``; the generic structs (``kvm_run``, ``kvm_one_reg``, ...) stay in the
core's module and are not redeclared here. ``kvmfw_x86_rdtsc`` reads the host TSC,
``kvmfw_x86_host_cpuid`` runs the host's CPUID instruction; ``kvmfw_x86_relocs`` checks and
applies a Linux kernel's relocation table (KASLR, :mod:`kvmfw_x86.vmlinux`): ~200,000
entries, a millisecond in C.
"""

from cffi import FFI

CDEF = r"""
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding;
};
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    unsigned long long interrupt_bitmap[4];
};
struct kvm_sregs2 {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    uint64_t flags; unsigned long long pdptrs[4];
};
struct kvm_fpu {
    uint8_t fpr[8][16]; uint16_t fcw; uint16_t fsw; uint8_t ftwx; uint16_t last_opcode;
    uint64_t last_ip; uint64_t last_dp; uint8_t xmm[16][16]; uint32_t mxcsr; ...;
};
struct kvm_xsave { uint32_t region[1024]; ...; };
struct kvm_xcr { uint32_t xcr; uint64_t value; ...; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; struct kvm_xcr xcrs[16]; ...; };
struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; ...; };
struct kvm_msr_list { uint32_t nmsrs; ...; };
struct kvm_cpuid_entry2 {
    uint32_t function, index, flags, eax, ebx, ecx, edx; ...;
};
struct kvm_cpuid2 { uint32_t nent; uint32_t padding; ...; };
struct kvm_lapic_state { char regs[1024]; };
struct kvm_debugregs { unsigned long long db[4]; uint64_t dr6; uint64_t dr7; uint64_t flags; ...; };
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_interrupt { uint32_t irq; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_tpr_access_ctl { uint32_t enabled; uint32_t flags; ...; };
struct kvm_vcpu_events {
    struct { uint8_t injected; uint8_t nr; uint8_t has_error_code; uint8_t pending;
             uint32_t error_code; } exception;
    struct { uint8_t injected; uint8_t nr; uint8_t soft; uint8_t shadow; } interrupt;
    struct { uint8_t injected; uint8_t pending; uint8_t masked; uint8_t pad; } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct { uint8_t smm; uint8_t pending; uint8_t smm_inside_nmi; uint8_t latched_init; } smi;
    struct { uint8_t pending; } triple_fault;
    uint8_t exception_has_payload;
    uint64_t exception_payload;
    ...;
};
struct kvm_translation {
    uint64_t linear_address; uint64_t physical_address;
    uint8_t valid; uint8_t writeable; uint8_t usermode; ...;
};

struct setup_header {
    uint8_t setup_sects; uint16_t root_flags; uint32_t syssize; uint16_t ram_size;
    uint16_t vid_mode; uint16_t root_dev; uint16_t boot_flag; uint16_t jump;
    uint32_t header; uint16_t version; uint32_t realmode_swtch; uint16_t start_sys_seg;
    uint16_t kernel_version; uint8_t type_of_loader; uint8_t loadflags;
    uint16_t setup_move_size; uint32_t code32_start; uint32_t ramdisk_image;
    uint32_t ramdisk_size; uint32_t bootsect_kludge; uint16_t heap_end_ptr;
    uint8_t ext_loader_ver; uint8_t ext_loader_type; uint32_t cmd_line_ptr;
    uint32_t initrd_addr_max; uint32_t kernel_alignment; uint8_t relocatable_kernel;
    uint8_t min_alignment; uint16_t xloadflags; uint32_t cmdline_size;
    uint32_t hardware_subarch; uint64_t hardware_subarch_data; uint32_t payload_offset;
    uint32_t payload_length; uint64_t setup_data; uint64_t pref_address;
    uint32_t init_size; uint32_t handover_offset; ...;
};
struct boot_e820_entry { uint64_t addr; uint64_t size; uint32_t type; ...; };
struct boot_params {
    uint32_t ext_ramdisk_image; uint32_t ext_ramdisk_size; uint32_t ext_cmd_line_ptr;
    uint8_t e820_entries;
    struct setup_header hdr;
    struct boot_e820_entry e820_table[128];
    ...;
};

#define KVM_CPUID_FLAG_SIGNIFCANT_INDEX ...
#define KVM_VCPUEVENT_VALID_NMI_PENDING ...
#define KVM_VCPUEVENT_VALID_SIPI_VECTOR ...
#define KVM_VCPUEVENT_VALID_SHADOW ...
#define KVM_VCPUEVENT_VALID_SMM ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_INIT_RECEIVED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MP_STATE_SIPI_RECEIVED ...

/* the headers' own ioctl numbers, for the layout test */
static const unsigned long HDR_KVM_GET_MSR_INDEX_LIST;
static const unsigned long HDR_KVM_GET_SUPPORTED_CPUID;
static const unsigned long HDR_KVM_GET_SUPPORTED_HV_CPUID;
static const unsigned long HDR_KVM_GET_MSR_FEATURE_INDEX_LIST;
static const unsigned long HDR_KVM_CREATE_PIT2;
static const unsigned long HDR_KVM_GET_REGS;
static const unsigned long HDR_KVM_SET_REGS;
static const unsigned long HDR_KVM_GET_SREGS;
static const unsigned long HDR_KVM_SET_SREGS;
static const unsigned long HDR_KVM_TRANSLATE;
static const unsigned long HDR_KVM_INTERRUPT;
static const unsigned long HDR_KVM_GET_MSRS;
static const unsigned long HDR_KVM_SET_MSRS;
static const unsigned long HDR_KVM_GET_FPU;
static const unsigned long HDR_KVM_SET_FPU;
static const unsigned long HDR_KVM_GET_LAPIC;
static const unsigned long HDR_KVM_SET_LAPIC;
static const unsigned long HDR_KVM_SET_CPUID2;
static const unsigned long HDR_KVM_GET_CPUID2;
static const unsigned long HDR_KVM_GET_MP_STATE;
static const unsigned long HDR_KVM_SET_MP_STATE;
static const unsigned long HDR_KVM_GET_VCPU_EVENTS;
static const unsigned long HDR_KVM_SET_VCPU_EVENTS;
static const unsigned long HDR_KVM_GET_DEBUGREGS;
static const unsigned long HDR_KVM_SET_DEBUGREGS;
static const unsigned long HDR_KVM_GET_XSAVE;
static const unsigned long HDR_KVM_SET_XSAVE;
static const unsigned long HDR_KVM_GET_XCRS;
static const unsigned long HDR_KVM_SET_XCRS;
static const unsigned long HDR_KVM_SET_TSC_KHZ;
static const unsigned long HDR_KVM_GET_TSC_KHZ;
static const unsigned long HDR_KVM_GET_XSAVE2;
static const unsigned long HDR_KVM_GET_SREGS2;
static const unsigned long HDR_KVM_SET_SREGS2;
uint64_t kvmfw_x86_rdtsc(void);
void kvmfw_x86_host_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
int64_t kvmfw_x86_relocs(const uint8_t *tab, uint64_t words, uint8_t *img, uint64_t len,
                         uint64_t base, uint64_t delta, uint64_t *rest);
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <linux/kvm.h>
#include <asm/bootparam.h>
static const unsigned long HDR_KVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;
static const unsigned long HDR_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long HDR_KVM_GET_SUPPORTED_HV_CPUID = KVM_GET_SUPPORTED_HV_CPUID;
static const unsigned long HDR_KVM_GET_MSR_FEATURE_INDEX_LIST = KVM_GET_MSR_FEATURE_INDEX_LIST;
static const unsigned long HDR_KVM_CREATE_PIT2 = KVM_CREATE_PIT2;
static const unsigned long HDR_KVM_GET_REGS = KVM_GET_REGS;
static const unsigned long HDR_KVM_SET_REGS = KVM_SET_REGS;
static const unsigned long HDR_KVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long HDR_KVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long HDR_KVM_TRANSLATE = KVM_TRANSLATE;
static const unsigned long HDR_KVM_INTERRUPT = KVM_INTERRUPT;
static const unsigned long HDR_KVM_GET_MSRS = KVM_GET_MSRS;
static const unsigned long HDR_KVM_SET_MSRS = KVM_SET_MSRS;
static const unsigned long HDR_KVM_GET_FPU = KVM_GET_FPU;
static const unsigned long HDR_KVM_SET_FPU = KVM_SET_FPU;
static const unsigned long HDR_KVM_GET_LAPIC = KVM_GET_LAPIC;
static const unsigned long HDR_KVM_SET_LAPIC = KVM_SET_LAPIC;
static const unsigned long HDR_KVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long HDR_KVM_GET_CPUID2 = KVM_GET_CPUID2;
static const unsigned long HDR_KVM_GET_MP_STATE = KVM_GET_MP_STATE;
static const unsigned long HDR_KVM_SET_MP_STATE = KVM_SET_MP_STATE;
static const unsigned long HDR_KVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long HDR_KVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
static const unsigned long HDR_KVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
static const unsigned long HDR_KVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
static const unsigned long HDR_KVM_GET_XSAVE = KVM_GET_XSAVE;
static const unsigned long HDR_KVM_SET_XSAVE = KVM_SET_XSAVE;
static const unsigned long HDR_KVM_GET_XCRS = KVM_GET_XCRS;
static const unsigned long HDR_KVM_SET_XCRS = KVM_SET_XCRS;
static const unsigned long HDR_KVM_SET_TSC_KHZ = KVM_SET_TSC_KHZ;
static const unsigned long HDR_KVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;
static const unsigned long HDR_KVM_GET_XSAVE2 = KVM_GET_XSAVE2;
static const unsigned long HDR_KVM_GET_SREGS2 = KVM_GET_SREGS2;
static const unsigned long HDR_KVM_SET_SREGS2 = KVM_SET_SREGS2;
static uint64_t kvmfw_x86_rdtsc(void) {
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static void kvmfw_x86_host_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]) {
    __asm__ __volatile__("cpuid" : "=a"(out[0]), "=b"(out[1]), "=c"(out[2]), "=d"(out[3])
                         : "a"(leaf), "c"(subleaf));
}
/* The relocation table an x86-64 kernel build appends to vmlinux.bin, in the order its
   decompressor reads it, backwards from the end (arch/x86/boot/compressed/misc.c,
   handle_relocations): the 32-bit fields, a zero, the inverse 32-bit fields, a zero, the
   64-bit fields, a zero. Each entry is the kernel virtual address of a field, as a 32-bit
   value sign-extended to 64 bits; ``base`` is the virtual address of img[0] and ``len``
   the image's length. The first three fields move by +delta, -delta, +delta.
   Every entry is checked before anything is written, and nothing is written when img is
   NULL or an entry is bad. Returns the number of entries, with *rest the table words left
   before the last zero (0: the table fills ``tab`` exactly); -1 when an entry points
   outside the image (*rest: its word index); -2 when ``tab`` ends before three zeros. */
static int64_t kvmfw_x86_reloc_walk(const uint8_t *tab, uint64_t words, uint8_t *img,
                                    uint64_t len, uint64_t base, uint64_t delta,
                                    uint64_t *rest) {
    uint64_t i = words;
    int64_t count = 0;
    for (int kind = 0; kind < 3; kind++) {
        for (;;) {
            uint32_t v;
            if (i == 0)
                return -2;
            i--;
            memcpy(&v, tab + 4 * i, 4);
            if (v == 0)
                break;
            uint64_t off = (uint64_t)(int64_t)(int32_t)v - base;
            uint64_t width = kind == 2 ? 8 : 4;
            if (off > len || len - off < width) {
                *rest = i;
                return -1;
            }
            if (img != NULL) {
                if (kind == 2) {
                    uint64_t x;
                    memcpy(&x, img + off, 8);
                    x += delta;
                    memcpy(img + off, &x, 8);
                } else {
                    uint32_t x;
                    memcpy(&x, img + off, 4);
                    x = kind == 0 ? x + (uint32_t)delta : x - (uint32_t)delta;
                    memcpy(img + off, &x, 4);
                }
            }
            count++;
        }
    }
    *rest = i;
    return count;
}
static int64_t kvmfw_x86_relocs(const uint8_t *tab, uint64_t words, uint8_t *img, uint64_t len,
                                uint64_t base, uint64_t delta, uint64_t *rest) {
    int64_t n = kvmfw_x86_reloc_walk(tab, words, NULL, len, base, delta, rest);
    if (n < 0 || img == NULL)
        return n;
    return kvmfw_x86_reloc_walk(tab, words, img, len, base, delta, rest);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvmfw_x86._x86", SOURCE, py_limited_api=True)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
