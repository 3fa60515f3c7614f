/*
 * kvmfw_ops.h - guest-side calls into kvmfw's pseudo-op device (gem5 m5ops, address mode).
 *
 * The device is a 64 KiB MMIO window (default guest-physical 0xffff0000); see
 * kvmfw_devices/pseudo_op.py for the layout. Bare-metal guests with the window identity
 * mapped use KVMFW_OPS_BASE directly; a Linux program maps it through /dev/mem and calls
 * kvmfw_ops_init() with the mapping (see kvmfwop.c).
 *
 * Address arguments are guest-physical. A program that does not know physical addresses
 * passes data through the window's own buffer: kvmfw_buf() is its virtual address here and
 * kvmfw_buf_phys() the physical address to pass to the device.
 */
#ifndef KVMFW_OPS_H
#define KVMFW_OPS_H

#include <stdint.h>

#ifndef KVMFW_OPS_BASE
#define KVMFW_OPS_BASE 0xffff0000UL
#endif
#define KVMFW_OPS_SIZE 0x10000UL
#define KVMFW_OPS_MAGIC 0x000000014f4d564bULL

#define KVMFW_REG_ARG(i) (8u * (i))
#define KVMFW_REG_RESULT 0x30u
#define KVMFW_REG_MAGIC 0x38u
#define KVMFW_BUF_OFFSET 0x8000u
#define KVMFW_BUF_SIZE 0x8000u

#define KVMFW_OP_RPNS 0x07
#define KVMFW_OP_EXIT 0x21
#define KVMFW_OP_FAIL 0x22
#define KVMFW_OP_SUM 0x23
#define KVMFW_OP_RESET_STATS 0x40
#define KVMFW_OP_DUMP_STATS 0x41
#define KVMFW_OP_DUMP_RESET_STATS 0x42
#define KVMFW_OP_CHECKPOINT 0x43
#define KVMFW_OP_WRITE_FILE 0x4f
#define KVMFW_OP_READ_FILE 0x50
#define KVMFW_OP_WORK_BEGIN 0x5a
#define KVMFW_OP_WORK_END 0x5b
#define KVMFW_FAILED (~(uint64_t)0)

static volatile uint8_t *kvmfw_ops_window = (volatile uint8_t *)KVMFW_OPS_BASE;
static uint64_t kvmfw_ops_phys = KVMFW_OPS_BASE;

/* Use a mapping of the window (e.g. from mmap of /dev/mem) at physical address `phys`. */
static inline void kvmfw_ops_init(volatile void *window, uint64_t phys)
{
    kvmfw_ops_window = (volatile uint8_t *)window;
    kvmfw_ops_phys = phys;
}

static inline volatile uint64_t *kvmfw_reg(unsigned offset)
{
    return (volatile uint64_t *)(kvmfw_ops_window + offset);
}

static inline volatile uint8_t *kvmfw_buf(void) { return kvmfw_ops_window + KVMFW_BUF_OFFSET; }
static inline uint64_t kvmfw_buf_phys(void) { return kvmfw_ops_phys + KVMFW_BUF_OFFSET; }
static inline int kvmfw_ops_present(void) { return *kvmfw_reg(KVMFW_REG_MAGIC) == KVMFW_OPS_MAGIC; }

/* Run operation `op` with up to four arguments; returns its result (KVMFW_FAILED on error). */
static inline uint64_t kvmfw_op4(unsigned op, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3)
{
    *kvmfw_reg(KVMFW_REG_ARG(0)) = a0;
    *kvmfw_reg(KVMFW_REG_ARG(1)) = a1;
    *kvmfw_reg(KVMFW_REG_ARG(2)) = a2;
    *kvmfw_reg(KVMFW_REG_ARG(3)) = a3;
    return *kvmfw_reg(op << 8);
}

static inline uint64_t kvmfw_rpns(void) { return kvmfw_op4(KVMFW_OP_RPNS, 0, 0, 0, 0); }
static inline void kvmfw_exit(uint64_t code) { *kvmfw_reg(KVMFW_OP_EXIT << 8) = code; }
static inline void kvmfw_fail(uint64_t code) { *kvmfw_reg(KVMFW_OP_FAIL << 8) = code; }
static inline uint64_t kvmfw_reset_stats(void) { return kvmfw_op4(KVMFW_OP_RESET_STATS, 0, 0, 0, 0); }
static inline uint64_t kvmfw_dump_stats(void) { return kvmfw_op4(KVMFW_OP_DUMP_STATS, 0, 0, 0, 0); }
static inline uint64_t kvmfw_dump_reset_stats(void)
{
    return kvmfw_op4(KVMFW_OP_DUMP_RESET_STATS, 0, 0, 0, 0);
}
static inline uint64_t kvmfw_checkpoint(void) { return kvmfw_op4(KVMFW_OP_CHECKPOINT, 0, 0, 0, 0); }
static inline uint64_t kvmfw_work_begin(uint64_t work, uint64_t thread)
{
    return kvmfw_op4(KVMFW_OP_WORK_BEGIN, work, thread, 0, 0);
}
static inline uint64_t kvmfw_work_end(uint64_t work, uint64_t thread)
{
    return kvmfw_op4(KVMFW_OP_WORK_END, work, thread, 0, 0);
}
/* Host file `name_phys` (a NUL-terminated name at a guest-physical address). */
static inline uint64_t kvmfw_read_file(uint64_t dst_phys, uint64_t len, uint64_t off,
                                       uint64_t name_phys)
{
    return kvmfw_op4(KVMFW_OP_READ_FILE, dst_phys, len, off, name_phys);
}
static inline uint64_t kvmfw_write_file(uint64_t src_phys, uint64_t len, uint64_t off,
                                        uint64_t name_phys)
{
    return kvmfw_op4(KVMFW_OP_WRITE_FILE, src_phys, len, off, name_phys);
}

#endif /* KVMFW_OPS_H */
