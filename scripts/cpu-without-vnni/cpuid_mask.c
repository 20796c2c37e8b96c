/* LD_PRELOAD shim that makes a process see an AVX2-only x86-64 CPU (no AVX-512, no VNNI of any
 * kind, no AMX) on a machine that has them, so that libraries which pick their kernels from
 * CPUID (ONNX Runtime's MLAS and cpuinfo, oneDNN, ...) run the code paths of such a CPU on this
 * one. Used by scripts/cpu-without-vnni/run.sh to measure int8 against float32 as on a CPU
 * without VNNI (docs/benchmarks.md) when no such CPU is at hand.
 *
 * How: Linux's CPUID faulting (arch_prctl(ARCH_SET_CPUID, 0); /proc/cpuinfo flag `cpuid_fault`,
 * Intel CPUs and KVM guests) makes every CPUID instruction of the thread, and of the threads it
 * creates later, raise SIGSEGV. The handler runs the real CPUID with faulting briefly off, clears
 * the feature bits below and steps over the instruction. Faulting is reset by execve; LD_PRELOAD
 * carries the shim into child processes.
 *
 * Programs that install their own SIGSEGV handler (Rust's std for stack overflows, rustc, ...)
 * get it chained behind this one: sigaction() and signal() for SIGSEGV are intercepted.
 *
 * What it cannot hide: instructions still run if code uses them without asking CPUID, and
 * XGETBV still reports the AVX-512 register state enabled (libraries require the CPUID bit
 * too). Code that ran CPUID before this constructor (the dynamic loader's own checks for glibc's
 * string functions) keeps what it saw. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* The program's own SIGSEGV disposition, run for every fault that is not a CPUID. */
static struct sigaction previous;
static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);

static long set_cpuid(int allowed) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, allowed); }

static void mask(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) |
                (1u << 31));
        /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        *c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512_FP16 23, AMX-TILE 24,
         * AMX-INT8 25 */
        *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI 4, AVX512_BF16 5, AMX-FP16 21, AVX-IFMA 23 */
        *a &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        /* EDX: AVX-VNNI-INT8 4, AVX-NE-CONVERT 5, AMX-COMPLEX 8, AVX-VNNI-INT16 10, AVX10 19 */
        *d &= ~((1u << 4) | (1u << 5) | (1u << 8) | (1u << 10) | (1u << 19));
    } else if (leaf == 0x1d || leaf == 0x1e || leaf == 0x24) {
        /* AMX tile and AVX10 leaves */
        *a = *b = *c = *d = 0;
    }
}

static void on_segv(int sig, siginfo_t *si, void *context) {
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    /* A faulting CPUID is a general-protection fault (si_code SI_KERNEL) at 0F A2. */
    if (si->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t a, b, c, d, leaf = (uint32_t)r[REG_RAX], sub = (uint32_t)r[REG_RCX];
        set_cpuid(1);
        __cpuid_count(leaf, sub, a, b, c, d);
        set_cpuid(0);
        mask(leaf, sub, &a, &b, &c, &d);
        r[REG_RAX] = a;
        r[REG_RBX] = b;
        r[REG_RCX] = c;
        r[REG_RDX] = d;
        r[REG_RIP] += 2;
        return;
    }
    /* Any other segmentation fault: the program's handler, or the default (a core dump). */
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, si, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    } else {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL); /* the fault repeats on return, now fatal */
    }
}

/* The program asks for SIGSEGV: it gets recorded as the handler to chain to. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction)
        real_sigaction = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV)
        return real_sigaction(sig, act, old);
    if (old)
        *old = previous;
    if (act)
        previous = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, &old) == 0 ? old.sa_handler : SIG_ERR;
}

__attribute__((constructor)) static void start(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    /* On the alternate signal stack where the program set one (Rust does, to report stack
     * overflows); re-entrant, since the program's handler may run CPUID too. */
    sa.sa_flags |= SA_ONSTACK | SA_NODEFER;
    if (!real_sigaction)
        real_sigaction = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    if (real_sigaction(SIGSEGV, &sa, &previous) != 0 || set_cpuid(0) != 0) {
        perror("cpuid_mask: CPUID faulting is not available on this machine (needs the cpuid_fault flag)");
        _exit(97);
    }
}
