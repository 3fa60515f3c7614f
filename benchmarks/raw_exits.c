/* raw_exits.c - the C floor for kvmfw's exit benchmark.
 *
 * Runs tests/guests/realmode.bin (the same guest kvmfw runs) with program 8 (port IO
 * loop) or 9 (MMIO loop) for N iterations, handling each exit the cheapest way C can:
 * copy the data byte into a sink. Prints "<exits> <nanoseconds>" for the timed loop.
 *
 * usage: raw_exits <realmode.bin> <pio|mmio> <N>
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv)
{
    if (argc != 4) { fprintf(stderr, "usage: %s realmode.bin pio|mmio N\n", argv[0]); return 2; }
    long n = atol(argv[3]);
    int prog = strcmp(argv[2], "mmio") == 0 ? 9 : 8;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint8_t *ram = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint8_t *rom = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    FILE *f = fopen(argv[1], "rb");
    if (!f || fread(rom, 1, 0x1000, f) != 0x1000) die(argv[1]);
    fclose(f);
    struct kvm_userspace_memory_region r0 = {0, 0, 0, 0x10000, (uintptr_t)ram};
    struct kvm_userspace_memory_region r1 = {1, 0, 0xfffff000, 0x1000, (uintptr_t)rom};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r0) < 0 || ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r1) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    struct kvm_regs regs;
    if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0) die("KVM_GET_REGS");
    regs.rax = prog;
    regs.rcx = n;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    static uint8_t sink[64];
    long exits = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        exits++;
        if (run->exit_reason == KVM_EXIT_IO) {
            if (run->io.port == 0x13) break;
            sink[exits & 63] = *((uint8_t *)run + run->io.data_offset);
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            if (run->mmio.is_write) sink[exits & 63] = run->mmio.data[0];
        } else {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long ns = (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec);
    printf("%ld %ld\n", exits, ns);
    return sink[0] == 0xff;  /* keep the sink alive */
}
