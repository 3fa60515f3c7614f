/*
 * kvmfwop - the guest command-line tool for kvmfw's pseudo-op device (like gem5's m5).
 *
 * Maps the pseudo-op window through /dev/mem (root, and a kernel without
 * CONFIG_STRICT_DEVMEM restrictions on that range) and runs one operation:
 *
 *   kvmfwop [-b BASE] exit [CODE] | fail [CODE] | checkpoint | dumpstats | resetstats |
 *           dumpresetstats | workbegin ID [THREAD] | workend ID [THREAD] | rpns |
 *           sum A B C D | readfile NAME > out | writefile NAME < in
 *
 * readfile/writefile move data through the window's own buffer, 32 KiB at a time, to and
 * from the file NAME in the host directory given to the device (pseudo-op,dir=PATH).
 *
 * Build: cc -O2 -static -o kvmfwop kvmfwop.c
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kvmfw_ops.h"

#define NAME_SPACE 256u
#define CHUNK (KVMFW_BUF_SIZE - NAME_SPACE)

static void die(const char *what)
{
    fprintf(stderr, "kvmfwop: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* MMIO copies with plain 8-byte and 1-byte accesses (no vector instructions). */
static void to_window(volatile uint8_t *dst, const uint8_t *src, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v;
        memcpy(&v, src + i, 8);
        *(volatile uint64_t *)(dst + i) = v;
    }
    for (; i < n; i++)
        dst[i] = src[i];
}

static void from_window(uint8_t *dst, const volatile uint8_t *src, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v = *(const volatile uint64_t *)(src + i);
        memcpy(dst + i, &v, 8);
    }
    for (; i < n; i++)
        dst[i] = src[i];
}

static uint64_t put_name(const char *name)
{
    size_t len = strlen(name);
    if (len >= NAME_SPACE) {
        fprintf(stderr, "kvmfwop: file name too long\n");
        exit(2);
    }
    to_window(kvmfw_buf(), (const uint8_t *)name, len + 1);
    return kvmfw_buf_phys();
}

static int read_file(const char *name)
{
    static uint8_t chunk[CHUNK];
    uint64_t off = 0;
    for (;;) {
        uint64_t name_phys = put_name(name);
        uint64_t n = kvmfw_read_file(kvmfw_buf_phys() + NAME_SPACE, CHUNK, off, name_phys);
        if (n == KVMFW_FAILED) {
            fprintf(stderr, "kvmfwop: readfile %s failed\n", name);
            return 1;
        }
        if (n == 0)
            return 0;
        from_window(chunk, kvmfw_buf() + NAME_SPACE, n);
        if (fwrite(chunk, 1, n, stdout) != n)
            die("stdout");
        off += n;
    }
}

static int write_file(const char *name)
{
    static uint8_t chunk[CHUNK];
    uint64_t off = 0;
    size_t n;
    do {
        n = fread(chunk, 1, CHUNK, stdin);
        to_window(kvmfw_buf() + NAME_SPACE, chunk, n);
        uint64_t name_phys = put_name(name);
        if (kvmfw_write_file(kvmfw_buf_phys() + NAME_SPACE, n, off, name_phys) != n) {
            fprintf(stderr, "kvmfwop: writefile %s failed\n", name);
            return 1;
        }
        off += n;
    } while (n == CHUNK);
    return 0;
}

static uint64_t num(int argc, char **argv, int i, uint64_t dflt)
{
    return i < argc ? strtoull(argv[i], NULL, 0) : dflt;
}

static int check(uint64_t result, const char *op)
{
    if (result == KVMFW_FAILED) {
        fprintf(stderr, "kvmfwop: %s failed (is the machine service available?)\n", op);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t base = KVMFW_OPS_BASE;
    int i = 1;
    if (argc > 2 && strcmp(argv[1], "-b") == 0) {
        base = strtoull(argv[2], NULL, 0);
        i = 3;
    }
    if (i >= argc) {
        fprintf(stderr, "usage: kvmfwop [-b BASE] exit [CODE] | fail [CODE] | checkpoint | "
                        "dumpstats | resetstats | dumpresetstats | workbegin ID [THREAD] | "
                        "workend ID [THREAD] | rpns | sum A B C D | readfile NAME | "
                        "writefile NAME\n");
        return 2;
    }
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd < 0)
        die("/dev/mem");
    void *win = mmap(NULL, KVMFW_OPS_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)base);
    if (win == MAP_FAILED)
        die("mmap /dev/mem");
    kvmfw_ops_init(win, base);
    if (!kvmfw_ops_present()) {
        fprintf(stderr, "kvmfwop: no kvmfw pseudo-op device at %#llx\n",
                (unsigned long long)base);
        return 2;
    }
    const char *cmd = argv[i];
    if (!strcmp(cmd, "exit"))
        kvmfw_exit(num(argc, argv, i + 1, 0));
    else if (!strcmp(cmd, "fail"))
        kvmfw_fail(num(argc, argv, i + 1, 1));
    else if (!strcmp(cmd, "checkpoint"))
        return check(kvmfw_checkpoint(), cmd);
    else if (!strcmp(cmd, "dumpstats"))
        return check(kvmfw_dump_stats(), cmd);
    else if (!strcmp(cmd, "resetstats"))
        return check(kvmfw_reset_stats(), cmd);
    else if (!strcmp(cmd, "dumpresetstats"))
        return check(kvmfw_dump_reset_stats(), cmd);
    else if (!strcmp(cmd, "workbegin"))
        return check(kvmfw_work_begin(num(argc, argv, i + 1, 0), num(argc, argv, i + 2, 0)), cmd);
    else if (!strcmp(cmd, "workend"))
        return check(kvmfw_work_end(num(argc, argv, i + 1, 0), num(argc, argv, i + 2, 0)), cmd);
    else if (!strcmp(cmd, "rpns"))
        printf("%llu\n", (unsigned long long)kvmfw_rpns());
    else if (!strcmp(cmd, "sum"))
        printf("%llu\n", (unsigned long long)kvmfw_op4(KVMFW_OP_SUM, num(argc, argv, i + 1, 0),
               num(argc, argv, i + 2, 0), num(argc, argv, i + 3, 0), num(argc, argv, i + 4, 0)));
    else if (!strcmp(cmd, "readfile") && i + 1 < argc)
        return read_file(argv[i + 1]);
    else if (!strcmp(cmd, "writefile") && i + 1 < argc)
        return write_file(argv[i + 1]);
    else {
        fprintf(stderr, "kvmfwop: unknown command %s\n", cmd);
        return 2;
    }
    return 0;
}
