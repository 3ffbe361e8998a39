/* A CPU without AVX-512 (and AVX-VNNI, AMX), emulated on one that has them, for same-run
 * baselines: preloaded into a process (LD_PRELOAD), it turns on CPUID faulting for the process
 * (arch_prctl ARCH_SET_CPUID; Linux 4.12+, a CPU or hypervisor with CPUID faulting) and answers
 * each CPUID from a SIGSEGV handler with the real leaf minus those features. numpy, onnxruntime
 * (MLAS) and bfpaccel then pick their AVX2 code paths, as on an AVX2-only CPU of this core's
 * speed. The setting is per thread and inherited by the threads created later; glibc's own
 * string functions (chosen before this runs) keep their wider variants.
 *
 * The SIGSEGV handler must stay installed: a program that installs its own later (Python's
 * faulthandler, which pytest enables) would turn the next CPUID into a crash. So sigaction() for
 * SIGSEGV is interposed here: the program's handler is kept as the one a real fault is passed
 * to, and the program reads back what it set.
 *
 * Build: cc -O2 -shared -fPIC -o isa_mask.so isa_mask.c -ldl (bench/isa_mask/run.py does it).
 * A process where CPUID faulting cannot be turned on exits with status 3 and a message. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_SET_CPUID
#define ARCH_SET_CPUID 0x1012
#endif

static struct sigaction previous; /* the program's SIGSEGV handler: real faults go there */
static int (*real_sigaction)(int, const struct sigaction*, struct sigaction*);

static int call_real_sigaction(int sig, const struct sigaction* act, struct sigaction* old) {
    if (!real_sigaction) real_sigaction = (int (*)(int, const struct sigaction*, struct sigaction*))dlsym(RTLD_NEXT, "sigaction");
    return real_sigaction(sig, act, old);
}

static void on_segv(int sig, siginfo_t* si, void* ctx);

/* The program's sigaction: SIGSEGV's handler is recorded as `previous` (this file's stays) */
int sigaction(int sig, const struct sigaction* act, struct sigaction* old) {
    if (sig != SIGSEGV) return call_real_sigaction(sig, act, old);
    struct sigaction cur;
    if (call_real_sigaction(SIGSEGV, NULL, &cur) != 0) return -1;
    if (cur.sa_sigaction != on_segv) return call_real_sigaction(sig, act, old); /* not installed */
    if (old) *old = previous;
    if (act) previous = *act;
    return 0;
}

static void on_segv(int sig, siginfo_t* si, void* ctx) {
    ucontext_t* uc = (ucontext_t*)ctx;
    greg_t* g = uc->uc_mcontext.gregs;
    const unsigned char* ip = (const unsigned char*)g[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* not a CPUID: a real fault, for the program's handler */
        if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction) {
            previous.sa_sigaction(sig, si, ctx);
            return;
        }
        if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN && previous.sa_handler) {
            previous.sa_handler(sig);
            return;
        }
        call_real_sigaction(SIGSEGV, &previous, NULL);
        return; /* the instruction faults again, now under the default action */
    }
    unsigned leaf = (unsigned)g[REG_RAX], sub = (unsigned)g[REG_RCX], a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, a, b, c, d);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL */
        b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        /* ECX: AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
        c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512_FP16, AMX-TILE, AMX-INT8 */
        d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        a &= ~((1u << 4) | (1u << 5) | (1u << 23)); /* AVX-VNNI, AVX512_BF16, AVX-IFMA */
    }
    g[REG_RAX] = a;
    g[REG_RBX] = b;
    g[REG_RCX] = c;
    g[REG_RDX] = d;
    g[REG_RIP] += 2;
    (void)sig;
    (void)si;
}

__attribute__((constructor)) static void isa_mask_init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    call_real_sigaction(SIGSEGV, &sa, &previous);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        perror("isa_mask: CPUID faulting (arch_prctl ARCH_SET_CPUID) is not available here");
        _exit(3);
    }
}
